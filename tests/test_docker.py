"""Static checks of the Docker images: no Docker engine, no network.

The build context of every image is the repository root, so COPY sources are repository paths
and must survive .dockerignore; the L4T image must not install torch, torchvision, onnx or
onnxruntime in any way; docker/build.sh must name the documented base images and print, and
run, the exact buildx commands.
"""

import configparser
import json
import os
import platform
import re
import shlex
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BUILD_SH = DOCKER / "build.sh"
LINT_SH = DOCKER / "lint.sh"
DOCKERFILES = {"host": DOCKER / "Dockerfile.host", "l4t": DOCKER / "Dockerfile.l4t"}
TARGETS = ("host", "tx2", "orin-jp5", "orin-jp6")
L4T_TARGETS = TARGETS[1:]

# The base images the issue fixes; orin presets must be r35.x / r36.x tags of l4t-jetpack.
BASE_IMAGES = {
    "tx2": "nvcr.io/nvidia/l4t-base:r32.7.1",
    "orin-jp5": "nvcr.io/nvidia/l4t-jetpack:r35.4.1",
    "orin-jp6": "nvcr.io/nvidia/l4t-jetpack:r36.4.0",
}

# Never in the device image: the host stack, and TensorRT from pip (it comes from JetPack).
FORBIDDEN_ON_DEVICE = {
    "torch",
    "torchvision",
    "torch-pruning",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxslim",
    "onnxscript",
    "onnx-simplifier",
    "onnxsim",
    "tensorrt",
}

PROJECT = "rsedge"


# --------------------------------------------------------------------------------------------
# Dockerfile parsing


def instructions(text):
    """[(line, KEYWORD, arguments)], continuation lines joined as Docker joins them."""
    out, buf, start = [], None, 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if buf is None:
            if not stripped or stripped.startswith("#"):
                continue
            buf, start = "", number
        elif not stripped or stripped.startswith("#"):
            # Docker drops comment and empty lines inside a continued instruction.
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        buf = None
    assert buf is None, "instruction continued past the end of the file"
    return out


def stages(text):
    """[{'name', 'base', 'instructions'}], one per FROM."""
    result = []
    for number, keyword, args in instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            result.append({"name": name, "base": words[0], "instructions": []})
        elif result:
            result[-1]["instructions"].append((number, keyword, args))
    return result


def global_args(text):
    """ARG defaults declared before the first FROM."""
    values = {}
    for _, keyword, args in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = args.partition("=")
            values[key] = value.strip('"')
    return values


def declared_args(text):
    """{name: [default, ...]} for every ARG in the file."""
    values = {}
    for _, keyword, args in instructions(text):
        if keyword == "ARG":
            key, _, value = args.partition("=")
            values.setdefault(key, []).append(value.strip('"'))
    return values


def split_flags(args):
    """COPY/ADD/RUN arguments -> ({flag: value}, rest). Flags only lead the arguments."""
    flags = {}
    rest = args
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        key, _, value = word[2:].partition("=")
        flags.setdefault(key, []).append(value)
        rest = rest.lstrip()
    return flags, rest


def copy_sources(text):
    """[(line, source)] of every COPY/ADD source taken from the build context."""
    result = []
    for number, keyword, args in instructions(text):
        if keyword not in ("COPY", "ADD"):
            continue
        flags, rest = split_flags(args)
        if "from" in flags:
            continue  # another stage or an image, not the context
        words = json.loads(rest) if rest.startswith("[") else rest.split()
        assert len(words) >= 2, f"line {number}: {keyword} needs a source and a destination"
        for source in words[:-1]:
            if keyword == "ADD" and re.match(r"^(https?|git)://|^git@", source):
                continue
            result.append((number, source))
    return result


def run_mount_sources(text):
    """[(line, source)] of RUN --mount=type=bind without from=: those read the context too."""
    result = []
    for number, keyword, args in instructions(text):
        if keyword != "RUN":
            continue
        flags, _ = split_flags(args)
        for mount in flags.get("mount", []):
            options = dict(part.partition("=")[::2] for part in mount.split(","))
            if options.get("type", "bind") == "bind" and "from" not in options:
                result.append((number, options.get("source", options.get("src", "."))))
    return result


# --------------------------------------------------------------------------------------------
# pip requirements in RUN instructions

PIP_OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-f",
    "--find-links",
    "-w",
    "--wheel-dir",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--platform",
    "--python-version",
    "--implementation",
    "--abi",
    "--progress-bar",
    "--cache-dir",
    "--src",
    "-e",
    "--editable",
    "--upgrade-strategy",
    "--only-binary",
    "--no-binary",
    "--global-option",
    "--install-option",
    "--config-settings",
    "-C",
}


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(token):
    """pip argument -> (name, extras); the project itself (a path or a wheel) is PROJECT."""
    extras = set()
    match = re.search(r"\[([A-Za-z0-9_,.\- ]*)\]$", token)
    if match:
        extras = {normalize(e) for e in match.group(1).split(",") if e.strip()}
        token = token[: match.start()]
    if token.endswith((".whl", ".tar.gz", ".zip")):
        token = token.rsplit("/", 1)[-1].split("-", 1)[0]  # a distribution file: name-version-...
    if token in (".", "./") or token.startswith(("/", "./", "$")):
        # A path: the project's source tree or its wheel (a shell variable in the Dockerfiles).
        return (PROJECT if token in (".", "./") or PROJECT in token else token), extras
    name = re.split(r"[<>=!~;@ ]", token, maxsplit=1)[0]
    return normalize(name), extras


def pip_requirements(text):
    """[(line, name, extras)] for every package named by a pip install/wheel/download."""
    found = []
    for number, keyword, args in instructions(text):
        if keyword != "RUN":
            continue
        _, script = split_flags(args)
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        words = list(lexer)
        commands, current = [], []
        for word in words:
            if word and set(word) <= set(";&|()"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
        for command in commands:
            pip_at = [i for i, w in enumerate(command) if w == "pip" or w.endswith("/pip")]
            if not pip_at or len(command) <= pip_at[0] + 1:
                continue
            sub = command[pip_at[0] + 1]
            if sub not in ("install", "wheel", "download"):
                continue
            skip = False
            for word in command[pip_at[0] + 2 :]:
                if skip:
                    skip = False
                    continue
                if word.startswith("-"):
                    skip = word in PIP_OPTIONS_WITH_VALUE
                    continue
                # ${VAR:+"name==${VAR}"} expands to a requirement or to nothing.
                conditional = re.match(r"^\$\{\w+:\+(.*)\}$", word)
                if conditional:
                    word = conditional.group(1)
                name, extras = requirement(word)
                found.append((number, name, extras))
    return found


def setup_cfg_requirements():
    """{'': install_requires, extra: [...]} from setup.cfg as [(name, extras)], names normalized;
    extras matter for the project's own name (an extra that pulls in another extra)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg")

    def parse(value):
        result = []
        for line in value.splitlines():
            line = line.split("#", 1)[0].split(";", 1)[0].strip()
            if line:
                result.append(requirement(re.sub(r"\s+", "", re.split(r"[<>=!~]", line, maxsplit=1)[0])))
        return result

    reqs = {"": parse(parser.get("options", "install_requires", fallback=""))}
    if parser.has_section("options.extras_require"):
        for extra, value in parser.items("options.extras_require"):
            reqs[normalize(extra)] = parse(value)
    return reqs


def forbidden_installs(text, setup_reqs):
    """Human-readable list of forbidden packages the Dockerfile installs, directly or through
    the project's install_requires and the extras it asks for (followed through extras that
    name the project again)."""
    problems = []

    def expand(number, extras, seen):
        for extra in sorted(extras - seen):
            seen.add(extra)
            if extra not in setup_reqs:
                problems.append(f"line {number}: extra [{extra}] is not in setup.cfg")
                continue
            for dep, dep_extras in setup_reqs[extra]:
                if dep == PROJECT:
                    expand(number, dep_extras, seen)
                elif dep in FORBIDDEN_ON_DEVICE:
                    problems.append(f"line {number}: {dep} via [{extra}]")

    for number, name, extras in pip_requirements(text):
        if name == PROJECT:
            expand(number, {""} | extras, set())
        elif name in FORBIDDEN_ON_DEVICE:
            problems.append(f"line {number}: {name}")
    return problems


# --------------------------------------------------------------------------------------------
# .dockerignore, with the semantics of moby/patternmatcher (last match wins, a pattern that
# matches a parent folder matches what is inside it, ! re-includes)


def dockerignore_patterns(text):
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).replace(os.sep, "/")
        if len(line) > 1 and line.startswith("/"):
            line = line[1:]
        patterns.append((exclusion, pattern_regex(line)))
    return patterns


def pattern_regex(pattern):
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def ignored(path, patterns):
    path = os.path.normpath(path).replace(os.sep, "/")
    parents = path.split("/")[:-1]
    matched = False
    for exclusion, regex in patterns:
        if exclusion != matched:
            continue
        match = bool(regex.match(path))
        if not match:
            match = any(regex.match("/".join(parents[: i + 1])) for i in range(len(parents)))
        if match:
            matched = not exclusion
    return matched


# --------------------------------------------------------------------------------------------
# build.sh


def run_build(*args, env=None, check=True):
    proc = subprocess.run(
        ["bash", str(BUILD_SH)] + list(args),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(target, *extra):
    out = run_build(target, "--dry-run", *extra).stdout.strip().splitlines()
    assert len(out) == 1, f"one command per target, got {out!r}"
    return shlex.split(out[0])


def build_args(argv):
    values = {}
    for i, word in enumerate(argv):
        if word == "--build-arg":
            key, _, value = argv[i + 1].partition("=")
            assert key not in values, f"build arg {key} given twice"
            values[key] = value
    return values


def option(argv, name):
    return [argv[i + 1] for i, word in enumerate(argv) if word == name]


# ============================================================================================
# Tests: the parsers themselves, so that the checks below cannot pass by parsing nothing


def test_instructions_join_continuations_and_drop_inner_comments():
    text = textwrap.dedent("""\
        # syntax=docker/dockerfile:1
        FROM a AS b
        RUN one \\
        # a comment inside
            two \\

            three
        COPY --from=b /x /y
        """)
    assert [(k, a.split()) for _, k, a in instructions(text)] == [
        ("FROM", ["a", "AS", "b"]),
        ("RUN", ["one", "two", "three"]),
        ("COPY", ["--from=b", "/x", "/y"]),
    ]


def test_copy_sources_skip_stages_and_urls_and_keep_every_context_source():
    text = textwrap.dedent("""\
        FROM x AS build
        COPY --from=build /wheels /wheels
        COPY --chmod=0755 a.sh b.txt /dst/
        COPY ["with space.txt", "/dst/"]
        ADD https://example.com/key.asc /etc/key.asc
        RUN --mount=type=bind,from=build,source=/w,target=/w \
            --mount=type=bind,source=req.txt,target=/r true
        """)
    assert [s for _, s in copy_sources(text)] == ["a.sh", "b.txt", "with space.txt"]
    assert [s for _, s in run_mount_sources(text)] == ["req.txt"]


@pytest.mark.parametrize(
    "run, expected",
    [
        ("pip install torch==2.1", ["line 2: torch"]),
        ("python3 -m pip install -c c.txt onnxruntime-gpu numpy", ["line 2: onnxruntime-gpu"]),
        ('python3 -m pip wheel -w /w ".[host]"', ["line 2: torch via [host]"]),
        ('pip install "${rsedge_wheel[0]}[host]"', ["line 2: torch via [host]"]),
        ('pip install ${V:+"tensorrt==${V}"}', ["line 2: tensorrt"]),
        ('pip install --find-links /torch "rsedge[jetson]" && echo torch', []),
        ('pip install "rsedge[all]"', ["line 2: torch via [host]"]),
        ("pip install --no-index /wheels/torch-2.1.0-cp36-cp36m-linux_aarch64.whl", ["line 2: torch"]),
        ("apt-get install -y python3-torch-free", []),
    ],
)
def test_forbidden_installs_sees_direct_and_extra_installs(run, expected):
    text = f"FROM x\nRUN {run}\n"
    reqs = {
        "": [("numpy", set())],
        "host": [("torch", set()), ("numpy", set())],
        "jetson": [("pycuda", set())],
        "all": [(PROJECT, {"host", "jetson"})],
    }
    assert forbidden_installs(text, reqs) == expected


def test_dockerignore_matcher_follows_docker_semantics():
    patterns = dockerignore_patterns("*\n!pkg/\n**/__pycache__\n!keep/**/*.py\n")
    assert ignored("data/train/img.png", patterns)
    assert ignored(".venv/bin/python", patterns)
    assert not ignored("pkg/mod.py", patterns)
    assert ignored("pkg/__pycache__/mod.cpython-311.pyc", patterns)
    assert not ignored("keep/a/b/c.py", patterns)
    assert ignored("keep/a/b/c.txt", patterns)


# ============================================================================================
# Tests: the Dockerfiles


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copy_source_exists_in_the_repository(kind):
    text = DOCKERFILES[kind].read_text()
    sources = copy_sources(text) + run_mount_sources(text)
    assert sources, "no COPY found: the parser or the Dockerfile is broken"
    missing = []
    for number, source in sources:
        assert not os.path.isabs(source) and ".." not in Path(source).parts, (
            f"line {number}: {source} is outside the build context"
        )
        if not list(REPO.glob(source.rstrip("/"))):
            missing.append(f"line {number}: {source}")
    assert not missing, f"{DOCKERFILES[kind].name} COPYs paths that do not exist: {missing}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerignore_keeps_every_copy_source_in_the_context(kind):
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    debris = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.py[cod]$")
    excluded = []
    for number, source in copy_sources(DOCKERFILES[kind].read_text()):
        for path in REPO.glob(source.rstrip("/")):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files + [path]:
                rel = file.relative_to(REPO).as_posix()
                if not debris.search(rel) and ignored(rel, patterns):
                    excluded.append(f"line {number}: {rel}")
    assert not excluded, f".dockerignore drops what {DOCKERFILES[kind].name} copies: {excluded}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "data/eurosat/train/a.jpg",
        "runs/exp1/model.safetensors",
        ".git/HEAD",
        "benchmarks/results/tx2-2024-01-01.json",
        "bundle/model.onnx",
        "runtime/__pycache__/x.pyc",
        "export/model.engine",
    ],
)
def test_dockerignore_keeps_data_runs_and_venv_out(path):
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    assert ignored(path, patterns)


def test_l4t_image_installs_no_torch_torchvision_onnx_or_onnxruntime():
    text = DOCKERFILES["l4t"].read_text()
    setup_reqs = setup_cfg_requirements()
    assert "jetson" in setup_reqs, "setup.cfg has no [jetson] extra"
    assert ("torch", set()) in setup_reqs["host"], "setup.cfg parsing is broken: [host] has no torch"
    assert forbidden_installs(text, setup_reqs) == []
    installed = pip_requirements(text)
    project = [extras for _, name, extras in installed if name == PROJECT]
    assert project and all(extras == {"jetson"} for extras in project), (
        f"the L4T image must install rsedge with exactly the jetson extra, got {project!r}"
    )
    assert {"pycuda", "numpy"} <= {name for _, name, _ in installed}
    assert not re.search(r"(?i)\bapt-get install\b[^&;]*\b(python3-)?(torch|onnx)", text)


def test_host_image_installs_the_host_extra_and_tensorrt():
    installed = pip_requirements(DOCKERFILES["host"].read_text())
    assert any(name == PROJECT and extras == {"host"} for _, name, extras in installed)
    assert "tensorrt" in {name for _, name, _ in installed}


def test_l4t_final_stage_has_no_compiler_and_runs_rsedge_bench_as_non_root():
    final = stages(DOCKERFILES["l4t"].read_text())[-1]
    assert final["name"] is None and final["base"] == "${BASE_IMAGE}"
    runs = " ".join(args for _, keyword, args in final["instructions"] if keyword == "RUN")
    for tool in ("build-essential", "python3-dev", "gcc", "cuda-nvcc", "pip wheel"):
        assert tool not in runs, f"{tool} belongs in the build stage"
    entrypoint = [args for _, keyword, args in final["instructions"] if keyword == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["rsedge-bench"]
    copies = [args for _, keyword, args in final["instructions"] if keyword == "COPY"]
    assert any("benchmarks/bench_device.sh" in args for args in copies)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_final_user_is_not_root(kind):
    text = DOCKERFILES[kind].read_text()
    users = [args for _, keyword, args in stages(text)[-1]["instructions"] if keyword == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    if user.startswith("${"):
        user = declared_args(text)[user[2:-1]][-1]
    assert user not in ("root", "0")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_stage_starts_from_the_pinned_base_image_argument(kind):
    text = DOCKERFILES[kind].read_text()
    assert {stage["base"] for stage in stages(text)} == {"${BASE_IMAGE}"}
    base = global_args(text)["BASE_IMAGE"]
    assert re.match(r"^nvcr\.io/nvidia/[\w.-]+:[\w.-]+$", base) and not base.endswith(":latest")


# ============================================================================================
# Tests: docker/build.sh


@pytest.mark.parametrize("target", TARGETS)
def test_dry_run_prints_the_exact_buildx_command(target):
    argv = dry_run(target)
    kind = "host" if target == "host" else "l4t"
    assert argv[:3] == ["docker", "buildx", "build"]
    assert option(argv, "--platform") == (["linux/amd64"] if kind == "host" else ["linux/arm64"])
    assert option(argv, "--file") == [str(DOCKERFILES[kind])]
    assert option(argv, "--tag") == [f"rsedge:{target}"]
    assert "--load" in argv and "--push" not in argv
    assert argv[-1] == str(REPO), "the build context must be the repository root"
    assert set(build_args(argv)) <= set(declared_args(DOCKERFILES[kind].read_text())), (
        "build.sh passes a build arg the Dockerfile does not declare"
    )


@pytest.mark.parametrize("target", L4T_TARGETS)
def test_l4t_presets_name_the_documented_base_images(target):
    args = build_args(dry_run(target))
    assert args["BASE_IMAGE"] == BASE_IMAGES[target]
    assert args["TENSORRT_IN_IMAGE"] == ("0" if target == "tx2" else "1")


def test_tx2_preset_is_the_python36_jetpack4_stack():
    args = build_args(dry_run("tx2"))
    assert args["JETSON_APT_RELEASE"] == "r32.7"
    assert args["CUDA_HOME"] == "/usr/local/cuda-10.2"
    major, minor = (int(x) for x in args["PIP_VERSION"].split(".")[:2])
    assert major < 22, "pip 22 dropped Python 3.6"
    assert args["NUMPY_VERSION"].startswith("1.19."), "numpy 1.19 is the last for Python 3.6"


def test_host_preset_pins_an_ngc_tag_and_its_tensorrt():
    args = build_args(dry_run("host"))
    assert re.match(r"^nvcr\.io/nvidia/(pytorch|tensorrt):\d\d\.\d\d-py3$", args["BASE_IMAGE"])
    assert re.match(r"^\d+\.\d+\.\d+$", args["TENSORRT_VERSION"])


@pytest.mark.parametrize("target, kind", [("orin-jp6", "l4t"), ("host", "host")])
def test_dockerfile_defaults_equal_the_default_preset(target, kind):
    """A plain `docker build -f docker/Dockerfile.<kind> .` gets the same image as build.sh."""
    declared = declared_args(DOCKERFILES[kind].read_text())
    for key, value in build_args(dry_run(target)).items():
        assert value in declared[key], f"{key}: preset {value!r}, Dockerfile {declared[key]!r}"


def test_push_tags_into_the_registry_and_pushes():
    argv = dry_run("tx2", "--push", "registry.example.com/team/", "--build-arg", "JTOP_VERSION=4.2.12")
    assert option(argv, "--tag") == ["registry.example.com/team/rsedge:tx2"]
    assert "--push" in argv and "--load" not in argv
    assert build_args(argv)["JTOP_VERSION"] == "4.2.12"


def test_help_lists_the_exact_command_of_every_target():
    proc = run_build("--help")
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for target in TARGETS:
        assert run_build(target, "--dry-run").stdout.strip() in lines, target
    for image in BASE_IMAGES.values():
        assert image in proc.stdout
    assert "binfmt" in proc.stdout


@pytest.mark.parametrize("args", [("bogus",), ("tx2", "host"), ("tx2", "--push"), ()])
def test_bad_invocations_fail(args):
    proc = run_build(*args, "--dry-run", check=False) if args else run_build(check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip()


@pytest.fixture
def fake_docker(tmp_path):
    """A `docker` on PATH that answers `buildx version` and records any other call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.argv"
    script = bin_dir / "docker"
    script.write_text(
        textwrap.dedent("""\
        #!/bin/sh
        if [ "$1 $2" = "buildx version" ]; then echo "github.com/docker/buildx v0.17.1"; exit 0; fi
        for a in "$@"; do printf '%s\\n' "$a"; done > "{log}"
        """).format(log=log)
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, log, tmp_path


NATIVE_ARM64 = platform.machine().lower() in ("aarch64", "arm64")


@pytest.mark.skipif(NATIVE_ARM64, reason="no emulation needed on an arm64 machine")
def test_l4t_build_without_arm64_emulation_stops_and_explains(fake_docker):
    env, log, tmp = fake_docker
    env["BINFMT_MISC_DIR"] = str(tmp / "binfmt_misc")
    proc = run_build("orin-jp6", env=env, check=False)
    assert proc.returncode != 0
    assert "qemu" in proc.stderr and "tonistiigi/binfmt --install arm64" in proc.stderr
    assert not log.exists(), "docker buildx build ran without arm64 emulation"


@pytest.mark.skipif(NATIVE_ARM64, reason="no emulation needed on an arm64 machine")
def test_l4t_build_rejects_qemu_registered_without_fix_binary(fake_docker):
    env, log, tmp = fake_docker
    (tmp / "binfmt_misc").mkdir()
    (tmp / "binfmt_misc" / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: OC\n")
    env["BINFMT_MISC_DIR"] = str(tmp / "binfmt_misc")
    proc = run_build("tx2", env=env, check=False)
    assert proc.returncode != 0 and "F flag" in proc.stderr
    assert not log.exists()


@pytest.mark.parametrize("target", ["host", "tx2"])
def test_a_real_build_runs_exactly_the_printed_command(fake_docker, target):
    env, log, tmp = fake_docker
    (tmp / "binfmt_misc").mkdir()
    (tmp / "binfmt_misc" / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: POCF\n")
    env["BINFMT_MISC_DIR"] = str(tmp / "binfmt_misc")
    run_build(target, "--build-arg", "RSEDGE_UID=1234", env=env)
    assert log.read_text().splitlines() == dry_run(target, "--build-arg", "RSEDGE_UID=1234")[1:]


def test_lint_runs_hadolint_on_every_dockerfile_and_fails_with_it(tmp_path):
    calls = tmp_path / "calls"
    fake = textwrap.dedent("""\
        #!/bin/sh
        if [ "$1" = --version ]; then echo "{tool} 2.15.1 version: 0.10.0"; exit 0; fi
        echo "{tool} $*" >> "{calls}"
        exit {code}
        """)
    env = dict(os.environ)
    for tool, code in (("hadolint", "${FAKE_HADOLINT_RC:-0}"), ("shellcheck", "0")):
        path = tmp_path / tool
        path.write_text(fake.format(tool=tool, calls=calls, code=code))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        env[tool.upper()] = str(path)

    def lint():
        return subprocess.run(["bash", str(LINT_SH)], env=env, capture_output=True, text=True, timeout=60)

    ok = lint()
    assert ok.returncode == 0, ok.stderr
    hadolint_calls = [c for c in calls.read_text().splitlines() if c.startswith("hadolint ")]
    assert len(hadolint_calls) == 1
    for dockerfile in DOCKERFILES.values():
        assert str(dockerfile.relative_to(REPO)) in hadolint_calls[0].split()
    assert "--failure-threshold info" in hadolint_calls[0]
    assert "docker/build.sh" in calls.read_text() and "docker/lint.sh" in calls.read_text()

    env["FAKE_HADOLINT_RC"] = "1"
    failed = lint()
    assert failed.returncode != 0 and "FAILED" in failed.stderr
