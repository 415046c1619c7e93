#!/usr/bin/env bash
# The checks that need a CUDA device, in one run of under 8 minutes:
#   1. install hermes without its dependencies (`pip install -e . --no-deps`; torch is taken as it is), and
#      the few pure-Python packages the machine lacks, from wheels in $HERMES_WHEELS (default .whl/) when
#      the machine reaches no package index;
#   2. the GPU-marked tests (tests/test_gpu.py): each CUDA attention backend against the reference,
#      bfloat16 mixed precision through FSDP, fused AdamW, a one-process SFT run with CPU offload, and one
#      writing a step's profiler trace and CUDA memory snapshot;
#   3. the SFT step on a Llama 3.1 8B slice (4 blocks, the real vocabulary and head) at 8,192 tokens per
#      row, benchmarks/train_step.py --device cuda, summarised as tokens/s per GPU and MFU against the
#      bfloat16 peak of the chip torch names.
# Everything it prints also goes to OUT_DIR/gpu_check.log; each stage's own output to OUT_DIR/<stage>.log.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR          (from any directory; PYTHON=python3 by default)
#        benchmarks/gpu_check.sh --dry-run        (any machine: lists the packages it would install, the
#                                                  commands it would run and the GPU-marked tests they hold)
set -uo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
else
    out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR | --dry-run}
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
fi
cd "$(dirname "$0")/.."
((dry_run)) || exec > >(tee -a "$out/gpu_check.log") 2>&1
python=${PYTHON:-python3}
wheels=${HERMES_WHEELS:-.whl}
export PYTHONUNBUFFERED=1
start=$SECONDS
status=0
tests=(timeout -k 10 210 "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider)
benchmark=(timeout -k 10 240 "$python" benchmarks/train_step.py --device cuda --layers 4 --seq-len 8192
    --warmup 2 --steps 5)

stage() { echo; echo "== $1 ($((SECONDS - start)) s)"; }

# Modules hermes and its tests import that a CUDA image may lack, and the distribution of each.
missing=()
for pair in tomli_w:tomli-w llama_models:llama-models==0.3.0 pytest:pytest tqdm:tqdm; do
    module=${pair%%:*}
    if ! "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
        missing+=("${pair#*:}")
    fi
done

if ((dry_run)); then
    echo "would install (missing here): ${missing[*]:-nothing}, then hermes itself with --no-deps"
    echo "would run: ${tests[*]}"
    echo "would run: ${benchmark[*]}"
    echo "GPU-marked tests:"
    "$python" -m pytest --collect-only -q -m gpu tests/test_gpu.py -p no:cacheprovider | grep '::'
    exit
fi

stage "device"
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "torch sees no CUDA device: nothing to check"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

stage "install"
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    if [[ -d $wheels ]]; then
        "$python" -m pip install -q --no-index --no-deps --find-links "$wheels" "${missing[@]}" || status=1
    else
        "$python" -m pip install -q --no-deps "${missing[@]}" || status=1
    fi
fi
if ! "$python" -m pip install -q --no-deps --no-build-isolation -e .; then
    echo "pip could not install hermes in place; using it from $PWD through PYTHONPATH"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c 'import hermes.train.sft' || { echo "hermes does not import: see above"; exit 1; }

stage "GPU-marked tests"
"${tests[@]}" 2>&1 | tee "$out/tests.log" || status=1

stage "SFT step, Llama 3.1 8B slice at 8192 tokens"
"${benchmark[@]}" 2>&1 | tee "$out/train_step.log" || status=1

stage "summary"
"$python" - "$out/train_step.log" <<'EOF' | tee "$out/summary.txt" || status=1
"""tokens/s per GPU and MFU against the chip's own bfloat16 peak, from train_step.py's CUDA table (whose MFU
columns divide by an H100 SXM's 989 TFLOP/s; rows=1, so each row is one GPU's rate)."""
import re
import sys

# Dense bfloat16 peaks (TFLOP/s, no sparsity) by a substring of torch's device name, most specific first.
PEAKS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("GH200", 989), ("H200", 989), ("H800", 989),
         ("B200", 2250), ("A100", 312)]
TABLE_PEAK = 989

log = open(sys.argv[1]).read()
header = next((line for line in log.splitlines() if " slice: " in line), "")
chip = next((name for name, _ in PEAKS if name in header), None)
peak = dict(PEAKS).get(chip, TABLE_PEAK)
print(header)
print(f"chip: {chip or 'not recognised'}; bfloat16 peak used for MFU: {peak} TFLOP/s")
print(f"{'backend':<12}{'tokens/s/GPU':>13}{'MFU':>8}{'MFU labelled':>14}{'step s':>9}{'peak GiB':>10}")
rows = re.findall(r"^(\w+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+\S+$", log, re.M)
for backend, tokens, mfu, labelled, step, memory in rows:
    scale = TABLE_PEAK / peak
    print(f"{backend:<12}{int(tokens):>13}{float(mfu) * scale:>7.1f}%{float(labelled) * scale:>13.1f}%"
          f"{float(step):>9.3f}{float(memory):>10.1f}")
for line in log.splitlines():
    if line.endswith("out of memory"):
        print(line)
sys.exit(0 if rows else 1)
EOF

echo
echo "gpu_check: $( ((status)) && echo FAILED || echo passed ) in $((SECONDS - start)) s; logs in $out"
exit $status
