# Sourced by scripts/run and scripts/test: make .venv with the project installed.
# Usage: ensure_venv [extra]   (extra = "test" installs the test tools too)
ensure_venv() {
    local extra="${1:-}"
    command -v python3 >/dev/null || apt_install python3
    if [ ! -x .venv/bin/python ]; then
        # Debian's python3 needs python3-venv (ensurepip) to make a venv.
        if ! python3 -m venv .venv 2>/dev/null; then
            rm -rf .venv
            apt_install python3-venv
            python3 -m venv .venv
        fi
    fi
    local spec="."
    [ -n "$extra" ] && spec=".[$extra]"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
}

# apt_install PKG...: install the Debian packages that are missing (root or sudo).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}
