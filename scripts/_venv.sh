# Sourced by scripts/run and scripts/test: make .venv with the project installed, from only python3.
ensure_venv() {
    local venv="${VENV_DIR:-.venv}"
    local python="${PYTHON:-python3}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating virtualenv in $venv ..." >&2
        if ! "$python" -m venv "$venv"; then
            echo "error: '$python -m venv' failed; install Python's venv module (Debian: apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
    # Reinstall only when the dependency list changed.
    local stamp="$venv/.installed-$(cksum < pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ]; then
        echo "installing dependencies into $venv (first run takes a minute) ..." >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" >&2
        rm -f "$venv"/.installed-*
        touch "$stamp"
    fi
    export PATH="$PWD/$venv/bin:$PATH"
}
