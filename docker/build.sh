#!/usr/bin/env bash
# Build the rsedge images with docker buildx; docker/README.md explains the targets, the
# prerequisites and how to run the images. --help and --dry-run print the exact commands.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
targets=(host tx2 orin-jp5 orin-jp6)

# The presets. Each line is one --build-arg; the Dockerfiles' ARG defaults equal the host and
# orin-jp6 presets, so a plain `docker build` gets the same image.
preset() {
    case $1 in
        host)
            dockerfile=docker/Dockerfile.host
            platform=linux/amd64
            build_args=(
                BASE_IMAGE=nvcr.io/nvidia/pytorch:24.08-py3
                TENSORRT_VERSION=10.3.0
            ) ;;
        # JetPack 4.6.1, Python 3.6; CUDA 10.2 + TensorRT 8.2 mounted from the host. pip 21.3.1,
        # setuptools 59.6 and pytools 2022.1.12 are the last for Python 3.6; numpy 1.19.5's
        # aarch64 wheel is known to die with "Illegal instruction" on Jetson (its OpenBLAS), 1.19.4 not.
        tx2)
            dockerfile=docker/Dockerfile.l4t
            platform=linux/arm64
            build_args=(
                BASE_IMAGE=nvcr.io/nvidia/l4t-base:r32.7.1
                CUDA_HOME=/usr/local/cuda-10.2
                JETSON_APT_RELEASE=r32.7
                TENSORRT_IN_IMAGE=0
                PIP_VERSION=21.3.1
                SETUPTOOLS_VERSION=59.6.0
                WHEEL_VERSION=0.37.1
                NUMPY_VERSION=1.19.4
                PYCUDA_VERSION=2022.1
                PYTOOLS_VERSION=2022.1.12
            ) ;;
        orin-jp5)   # JetPack 5.1.2, Python 3.8, CUDA 11.4, TensorRT 8.5
            dockerfile=docker/Dockerfile.l4t
            platform=linux/arm64
            build_args=(
                BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r35.4.1
                CUDA_HOME=/usr/local/cuda
                JETSON_APT_RELEASE=
                TENSORRT_IN_IMAGE=1
                PIP_VERSION=24.0
                SETUPTOOLS_VERSION=69.5.1
                WHEEL_VERSION=0.43.0
                NUMPY_VERSION=1.24.4
                PYCUDA_VERSION=2024.1.2
                PYTOOLS_VERSION=2024.1.14
            ) ;;
        orin-jp6)   # JetPack 6.1, Python 3.10, CUDA 12.6, TensorRT 10.3
            dockerfile=docker/Dockerfile.l4t
            platform=linux/arm64
            build_args=(
                BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
                CUDA_HOME=/usr/local/cuda
                JETSON_APT_RELEASE=
                TENSORRT_IN_IMAGE=1
                PIP_VERSION=24.0
                SETUPTOOLS_VERSION=69.5.1
                WHEEL_VERSION=0.43.0
                NUMPY_VERSION=1.26.4
                PYCUDA_VERSION=2024.1.2
                PYTOOLS_VERSION=2024.1.14
            ) ;;
        *) return 1 ;;
    esac
}

usage() {
    cat <<EOF
Usage: docker/build.sh TARGET [--push REGISTRY] [--tag IMAGE] [--build-arg KEY=VALUE]... [--dry-run]

Builds one rsedge image with docker buildx, from the repository root as context.

Targets:
  host      x86_64 + CUDA (NGC PyTorch base): rsedge[host] + TensorRT; train, export, x86 benchmarks
  tx2       L4T r32.7.1 (JetPack 4.6.1, Python 3.6), nvcr.io/nvidia/l4t-base:r32.7.1
  orin-jp5  L4T r35.4.1 (JetPack 5.1.2, Python 3.8), nvcr.io/nvidia/l4t-jetpack:r35.4.1
  orin-jp6  L4T r36.4.0 (JetPack 6.1, Python 3.10),  nvcr.io/nvidia/l4t-jetpack:r36.4.0
  The L4T images hold only the device runtime (rsedge[jetson]: no torch, no onnx) and
  benchmarks/bench_device.sh; their entry point is rsedge-bench.

Options:
  --push REGISTRY   tag the image REGISTRY/rsedge:TARGET and push it instead of loading it
  --tag IMAGE       image reference to use instead of rsedge:TARGET (REGISTRY/ is still prefixed)
  --build-arg K=V   extra or overriding build argument (repeatable), e.g. JTOP_VERSION=4.2.12
  --dry-run         print the command and exit; nothing is checked or run
  -h, --help        this text

Prerequisites (checked before a real build):
  docker with the buildx plugin (docker buildx version).
  L4T targets on a non-arm64 machine: arm64 emulation registered with binfmt_misc (qemu), e.g.
      docker run --privileged --rm tonistiigi/binfmt --install arm64
  Emulated builds are slow (pycuda compiles under qemu); on a Jetson the build is native.

Commands, per target:
EOF
    local t
    for t in "${targets[@]}"; do
        echo "  $t:"
        echo "    $(command_line "$t" "" "" 0)"
    done
}

die() { echo "docker/build.sh: $*" >&2; exit 2; }

# command_line TARGET REGISTRY TAG PUSH [extra K=V...]: the buildx command, shell-quoted.
command_line() {
    local target=$1 registry=$2 tag=$3 push=$4
    shift 4
    preset "$target" || die "unknown target '$target' (one of: ${targets[*]})"
    local image=${tag:-rsedge:$target}
    [[ -n "$registry" ]] && image="${registry%/}/$image"
    local cmd=(docker buildx build --platform "$platform" --file "$repo/$dockerfile")
    local kv
    for kv in "${build_args[@]}" "$@"; do
        cmd+=(--build-arg "$kv")
    done
    cmd+=(--tag "$image")
    if (( push )); then cmd+=(--push); else cmd+=(--load); fi
    cmd+=("$repo")
    local out="" word
    for word in "${cmd[@]}"; do
        out+="${out:+ }$(printf '%q' "$word")"
    done
    echo "$out"
}

check_prerequisites() {
    local platform=$1
    command -v docker > /dev/null || die "docker is not installed (https://docs.docker.com/engine/install/)"
    docker buildx version > /dev/null 2>&1 || die "docker buildx is missing: install the buildx plugin
    (Docker's apt repository: apt-get install docker-buildx-plugin). JetPack's docker.io may lack
    it; docker/README.md shows the plugin binary in ~/.docker/cli-plugins and a build without it."
    [[ "$platform" == linux/arm64 ]] || return 0
    case $(uname -m) in
        aarch64|arm64) return 0 ;;   # a Jetson or another arm64 machine: native build
    esac
    local entry=${BINFMT_MISC_DIR:-/proc/sys/fs/binfmt_misc}/qemu-aarch64
    if [[ ! -r "$entry" ]] || [[ "$(head -n1 "$entry")" != enabled ]]; then
        die "this $(uname -m) machine cannot run arm64 build steps: $entry is missing or disabled.
    Every RUN of the L4T image executes arm64 binaries, which needs
    user-mode qemu registered with binfmt_misc. Register it (until the next reboot) with
        docker run --privileged --rm tonistiigi/binfmt --install arm64
    or permanently with: sudo apt-get install qemu-user-static binfmt-support"
    fi
    # Without the F (fix-binary) flag the interpreter path is resolved inside the build
    # container, where qemu does not exist.
    if ! grep -q '^flags:.*F' "$entry"; then
        die "qemu-aarch64 is registered without the F flag, so it cannot run inside build
    containers; re-register it with: docker run --privileged --rm tonistiigi/binfmt --install arm64"
    fi
}

# value OPTION ARGS...: OPTION must be followed by a value, not by the next option.
value() {
    if (( $# < 2 )) || [[ "$2" == -* ]]; then
        die "$1 needs a value (see --help)"
    fi
}

main() {
    local target="" registry="" tag="" push=0 dry_run=0 extra=()
    while (( $# )); do
        case $1 in
            -h|--help) usage; exit 0 ;;
            --dry-run) dry_run=1 ;;
            --push) value "$@"; registry=$2; push=1; shift ;;
            --tag) value "$@"; tag=$2; shift ;;
            --build-arg)
                value "$@"
                [[ "$2" == *=* ]] || die "--build-arg needs KEY=VALUE, got '$2'"
                extra+=("$2"); shift ;;
            -*) die "unknown option '$1' (see --help)" ;;
            *) [[ -z "$target" ]] || die "one target at a time (got '$target' and '$1')"
               target=$1 ;;
        esac
        shift
    done
    [[ -n "$target" ]] || { usage >&2; exit 2; }
    preset "$target" || die "unknown target '$target' (one of: ${targets[*]})"

    local line
    line=$(command_line "$target" "$registry" "$tag" "$push" ${extra[@]+"${extra[@]}"})
    if (( dry_run )); then
        echo "$line"
        return 0
    fi
    check_prerequisites "$platform"
    echo "+ $line" >&2
    cd "$repo"
    eval "$line"
}

main "$@"
