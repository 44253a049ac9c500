"""What a generation stage pays before its first reply, and whether starting CUDA in a thread hides some of it.

Each run is a fresh process that does what stage 02 does first: import torch and common, build the
HFBackend (transformers, tokenizer, the model on the GPU), one generate call of 8 prompts; laps in
seconds. Mode `plain` is the stages' order today; `overlap` first starts CUDA in a thread
(torch.zeros on the GPU) so that the context and libraries load while the main thread imports
transformers and reads the tokenizer and the weights. Two GPUs split a stage's generation but not
this, so it bounds what a second GPU can gain (bench/LOG.md). Runs alternate between the modes.

    python bench/startup.py --model=out/rehearsal/models/mistralai--Mistral-7B-Instruct-v0.2-x1 --runs=3
Writes: {out}/startup.json  {"runs": [{"mode", laps...}], "median": {mode: {lap: s}}}
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.knobs import configure  # noqa: E402
from pipeline.records import path  # noqa: E402

# -----------------------------------------------------------------------------
MODEL = "out/rehearsal/models/mistralai--Mistral-7B-Instruct-v0.2-x1"  # a local generator folder
RUNS = 3  # runs of each mode, alternating
OUT = "out/bench"  # folder for startup.json
# -----------------------------------------------------------------------------
configure(globals())

CHILD = """
import json, sys, threading, time
t0 = time.perf_counter()
laps, mark = {}, [t0]

def lap(name):
    now = time.perf_counter()
    laps[name], mark[0] = round(now - mark[0], 2), now

model, mode = sys.argv[1], sys.argv[2]
import torch
lap("import torch")
gpu = torch.cuda.is_available()  # else a CPU smoke test of this script
if mode == "overlap" and gpu:
    threading.Thread(target=lambda: torch.zeros(1, device="cuda"), daemon=True).start()
import common
lap("import common")
backend = common.HFBackend(model)
if gpu:
    torch.cuda.synchronize()
lap("HFBackend: transformers, tokenizer, model on the GPU")
prompts = [[{"role": "user", "content": f"Riddle {i}: what has keys but opens no locks?"}] for i in range(8)]
backend.generate(prompts, list(range(8)), max_new_tokens=8, temperature=0.7, top_p=0.95)
lap("first generate (8 prompts)")
laps["total"] = round(time.perf_counter() - t0, 2)
print(json.dumps(laps))
"""

root = Path(__file__).resolve().parents[1]
runs = []
for n in range(RUNS):
    for mode in ("plain", "overlap"):
        done = subprocess.run([sys.executable, "-c", CHILD, str(path(MODEL)), mode], cwd=root, capture_output=True,
                              text=True)
        if done.returncode:
            sys.exit(f"startup.py: the {mode} run failed:\n{done.stderr[-3000:]}")
        runs.append({"mode": mode, **json.loads(done.stdout.splitlines()[-1])})
        print(runs[-1])
median = {mode: {lap: statistics.median(r[lap] for r in runs if r["mode"] == mode) for lap in runs[0] if lap != "mode"}
          for mode in ("plain", "overlap")}
for lap in median["plain"]:
    print(f"  {lap:<55} {median['plain'][lap]:>6.2f} s plain  {median['overlap'][lap]:>6.2f} s overlap")
out = path(OUT)
out.mkdir(parents=True, exist_ok=True)
(out / "startup.json").write_text(json.dumps({"model": MODEL, "runs": runs, "median": median}, indent=1))
