#!/usr/bin/env bash
# Compiles the test contract with solcjs (npm `solc`, works offline) and writes
# contracts/out/HeraldTest.json = {"abi": [...], "bytecode": "0x..."}. The artifact is
# committed so that builds and tests do not need a compiler; re-run after editing the .sol.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$HERE/.."
[ -e "$ROOT/.tools/bin/solcjs" ] || bash "$ROOT/scripts/install-deps.sh"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$HERE" && node "$ROOT/.tools/bin/solcjs" --optimize --bin --abi -o "$tmp" HeraldTest.sol >/dev/null)
abi="$(ls "$tmp"/*HeraldTest.abi)"; bin="$(ls "$tmp"/*HeraldTest.bin)"
mkdir -p "$HERE/out"
node -e '
const fs = require("fs");
const abi = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const bytecode = "0x" + fs.readFileSync(process.argv[2], "utf8").trim();
fs.writeFileSync(process.argv[3], JSON.stringify({ abi, bytecode }, null, 2) + "\n");
' "$abi" "$bin" "$HERE/out/HeraldTest.json"
echo "wrote contracts/out/HeraldTest.json"
