# Shared by scripts/test.sh and scripts/run-example.sh (sourced, not run): find or install what
# they need, and when something cannot be installed, say exactly what is missing and stop.
#
# Debian packages come from apt-get (as root, or through sudo when it needs no password). Python
# packages go into a private virtual environment under target/, never into the system's Python.

# A progress line on stderr.
say() {
    printf '==> %s\n' "$*" >&2
}

# The reason we stop, on stderr, and stop.
fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# apt-get as root, or through sudo without a password; empty when neither is possible.
apt_command() {
    command -v apt-get >/dev/null || return 0
    if [ "$(id -u)" -eq 0 ]; then
        echo "apt-get"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        echo "sudo apt-get"
    fi
}

APT_UPDATED=""

# Installs Debian packages, or stops with the command a person should run.
apt_install() {
    local apt
    apt=$(apt_command)
    if [ -z "$apt" ]; then
        if command -v apt-get >/dev/null; then
            fail "missing Debian packages: $*. Install them as root: apt-get install $*"
        fi
        fail "missing: $* (Debian package names). This machine has no apt-get: install them with its package manager"
    fi
    say "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$APT_UPDATED" ]; then
        $apt update -q || fail "apt-get update failed; install by hand: $*"
        APT_UPDATED=1
    fi
    $apt install -y -q --no-install-recommends "$@" || fail "apt-get could not install: $*"
}

# Each argument is COMMAND:PACKAGE. Installs the packages of the commands that are not on PATH
# (with one apt-get call), then checks that every command is there.
need_commands() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        # A package may provide several of the commands: install each once.
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        apt_install "${missing[@]}"
    fi
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null \
            || fail "\`${pair%%:*}\` is still missing after installing the Debian package ${pair#*:}"
    done
}

# The Rust toolchain is the one thing these scripts do not install.
need_cargo() {
    command -v cargo >/dev/null \
        || fail "cargo is missing: install the Rust toolchain (rustup, or Debian's cargo and rustc packages if they are recent enough for Cargo.toml's rust-version)"
}

# MQTT.js (tests/js, from its lock file) and Node.js to run it.
need_mqtt_js() {
    need_commands node:nodejs
    # Some Node.js packages bring npm, Debian's does not (and its npm conflicts with the others).
    need_commands npm:npm
    if [ ! -f tests/js/node_modules/mqtt/package.json ] \
        || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
        say "installing MQTT.js into tests/js/node_modules (npm ci)"
        (cd tests/js && npm ci --no-audit --no-fund) || fail "npm ci in tests/js failed"
    fi
}

# The tests' Python: a virtual environment in target/test-venv with tests/python/requirements.txt.
# Prints nothing; sets TEST_VENV_PYTHON.
need_test_venv() {
    local venv=target/test-venv
    local stamp=$venv/.requirements
    TEST_VENV_PYTHON=$PWD/$venv/bin/python
    if [ -x "$TEST_VENV_PYTHON" ] && cmp -s tests/python/requirements.txt "$stamp"; then
        return 0
    fi
    need_commands python3:python3
    if [ ! -x "$TEST_VENV_PYTHON" ]; then
        say "creating the tests' Python environment in $venv"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            rm -rf "$venv"
            # Debian keeps venv's pip bootstrap in a package of its own.
            local version
            version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
            apt_install "python${version}-venv"
            python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
        fi
    fi
    say "installing tests/python/requirements.txt into $venv"
    "$TEST_VENV_PYTHON" -m pip install --disable-pip-version-check --progress-bar off \
        -r tests/python/requirements.txt || fail "pip could not install tests/python/requirements.txt"
    cp tests/python/requirements.txt "$stamp"
}
