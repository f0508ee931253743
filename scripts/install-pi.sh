#!/usr/bin/env bash
# Install or upgrade the edge daemon as a systemd service on Raspberry Pi OS (bookworm).
#
#   sudo scripts/install-pi.sh                 install, enable and (re)start edge.service
#   scripts/install-pi.sh --dry-run            print every command instead of running it
#   sudo scripts/install-pi.sh --no-start      install and enable, but do not start
#   scripts/install-pi.sh --root DIR           install below DIR (an image being built);
#                                              skips apt-get and the running systemd
#   --camera KIND                              camera.kind for a new /etc/edge/edge.toml
#                                              (picamera2, opencv or simulated)
#
# Running it again is safe: packages and the venv are reused, the project is reinstalled
# from this checkout, and an existing /etc/edge/edge.toml is never overwritten.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
dry_run=0
start=1
root=""
camera=picamera2

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "$0"
}

while (($#)); do
    case "$1" in
    --dry-run) dry_run=1 ;;
    --no-start) start=0 ;;
    --root)
        root=${2:?--root needs a directory}
        shift
        ;;
    --camera)
        camera=${2:?--camera needs a kind}
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "install-pi: unknown option $1" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
done

case "$camera" in
picamera2 | opencv | simulated) ;;
*)
    echo "install-pi: invalid --camera $camera; expected picamera2, opencv or simulated" >&2
    exit 2
    ;;
esac
if [[ -n $root && $root != /* ]]; then
    echo "install-pi: --root must be an absolute path, got $root" >&2
    exit 2
fi

# Paths on the target system; $root prefixes them when building an image.
venv=/opt/edge
config_dir=/etc/edge
config=$config_dir/edge.toml
unit=/etc/systemd/system/edge.service
sysusers=/usr/lib/sysusers.d/edge.conf
state_dir=/var/lib/edge
doc_dir=$venv/share/doc/edge
model_dir=$venv/models

# Print a command with shell quoting in dry-run mode, run it otherwise.
run() {
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

note() {
    echo "install-pi: $*" >&2
}

if ((!dry_run)) && [[ -z $root ]] && [[ $(id -u) -ne 0 ]]; then
    note "run as root (sudo $0 $*), or add --dry-run to see the commands"
    exit 1
fi

# 1. System packages: picamera2 and libcamera bindings, zbar for code reading, venv support.
if [[ -z $root ]]; then
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3-picamera2 python3-venv libzbar0
else
    note "--root given: skipping apt-get; install python3-picamera2 python3-venv libzbar0 in the image"
fi

# 2. The virtual environment. --system-site-packages makes the apt-installed picamera2 and
# libcamera bindings importable, because they are not on PyPI for this Python.
if [[ -x $root$venv/bin/python ]]; then
    if ! grep -qs '^include-system-site-packages *= *true' "$root$venv/pyvenv.cfg"; then
        note "$root$venv exists without --system-site-packages, so picamera2 is not importable;"
        note "remove it (rm -r $root$venv) and run this script again"
        exit 1
    fi
    note "reusing the virtual environment $root$venv"
else
    python=$(command -v python3 || true)
    if [[ -z $python ]]; then
        note "python3 not found; install python3 (3.11 or 3.12)"
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'; then
        note "$python is $("$python" --version 2>&1); edge needs Python 3.11 or 3.12"
        exit 1
    fi
    run "$python" -m venv --system-site-packages "$root$venv"
fi

# 3. The project with the pinned dependencies. --no-deps keeps pip from pulling in
# opencv-python (declared by rapidocr-onnxruntime), whose cv2 needs libGL.
pip=("$root$venv/bin/python" -m pip install --disable-pip-version-check --no-deps)
run "${pip[@]}" -r "$src/requirements.lock"
run "${pip[@]}" --force-reinstall "$src"

# 4. The detector model and the operations guide (the unit's Documentation=).
run install -d -m 0755 "$root$model_dir" "$root$doc_dir"
models=("$src"/models/*.onnx "$src"/models/*.txt)
found_model=0
for file in "${models[@]}"; do
    [[ -e $file ]] || continue
    run install -m 0644 "$file" "$root$model_dir/"
    [[ $file == *.onnx ]] && found_model=1
done
if ((!found_model)); then
    note "no model in $src/models/*.onnx; copy a detector to $model_dir/detector.onnx"
    note "(see models/README.md), or edge check-config and the service will fail"
fi
run install -m 0644 "$src/docs/operations.md" "$root$doc_dir/operations.md"

# 5. The system user edge, in the video group for the camera device nodes.
run install -D -m 0644 "$src/systemd/edge.sysusers.conf" "$root$sysusers"
if [[ -z $root ]]; then
    run systemd-sysusers edge.conf
else
    run systemd-sysusers --root="$root" edge.conf
fi

# 6. The configuration, created once from the example and never overwritten.
run install -d -m 0755 "$root$config_dir"
if [[ -e $root$config ]]; then
    note "keeping the existing $root$config"
else
    run install -m 0640 "$src/systemd/edge.example.toml" "$root$config"
    run sed -i \
        -e "s|^kind = \"simulated\"|kind = \"$camera\"|" \
        -e "s|^# model = \"$model_dir/detector.onnx\"|model = \"$model_dir/detector.onnx\"|" \
        "$root$config"
    if [[ -z $root ]]; then
        run chgrp edge "$root$config"
    fi
fi

# 7. The state directory for the outbox; systemd also creates it (StateDirectory=edge).
if [[ -z $root ]]; then
    run install -d -m 0750 -o edge -g edge "$state_dir"
else
    run install -d -m 0750 "$root$state_dir"
fi

# 8. The unit.
run install -D -m 0644 "$src/systemd/edge.service" "$root$unit"
if [[ -n $root ]]; then
    run systemctl --root="$root" enable edge.service
    exit 0
fi
run systemctl daemon-reload
run systemctl enable edge.service

if ((!dry_run)); then
    if [[ $camera == picamera2 ]] && ! "$venv/bin/python" -c 'import picamera2' 2>/dev/null; then
        note "picamera2 does not import in $venv; see 'No camera' in $doc_dir/operations.md"
    fi
    if ! "$venv/bin/edge" check-config "$config"; then
        note "fix $config, then: systemctl restart edge"
        exit 1
    fi
fi
if ((start)); then
    run systemctl restart edge.service
fi
if ((dry_run)); then
    note "dry run: nothing was changed"
elif ((start)); then
    note "started; follow the log with: journalctl -u edge -f"
else
    note "installed; start with: systemctl start edge"
fi
