"""Every training job end to end on a GPU: ``python scripts/gpu_train_check.py`` (needs a CUDA device to mean
anything; on a CPU it runs the same jobs there).

Each job (eagle, medusa, layerskip, draft_model) runs its smoke configuration on a tiny seeded target with the jobs'
default ``target.device: auto`` -- the target answers, featurizes and validates on the GPU, the module trains there
through accelerate -- then resumes from its saved state. Prints ``OK <job>`` with the devices the target was loaded
on, ``FAIL <job>`` with a traceback otherwise; exits 1 on any failure.
"""
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import torch

from specdec import models
from tests.tiny import save_tiny
from tests.train_fixtures import job_config
from train import draft_model, eagle, job, layerskip, medusa

ok = True
JOBS = [("eagle", eagle, []), ("medusa", medusa, []),
        ("layerskip", layerskip, ["drafter.skip_layers=[2]", "drafter.adapter_rank=4"]),
        ("draft_model", draft_model, ["drafter.num_layers=1", "drafter.draft_vocab_size=40"])]
for name, mod, over in JOBS:
    d = pathlib.Path(tempfile.mkdtemp())
    save_tiny(d / "target", seed=0, layers=4)
    t0 = time.time()
    try:
        cfg = job_config(d, name, over)
        final = job.run(mod.SPEC, cfg, progress=False)
        devs = sorted({k[2] for k in models._LOADED})
        print(f"OK {name} {time.time() - t0:.1f}s target devices {devs} final {final.exists()}", flush=True)
        cfg2 = job_config(d, name, [*over, "resume=true"])
        job.run(mod.SPEC, cfg2, progress=False)
        print(f"OK {name} resume", flush=True)
    except Exception as e:  # noqa: BLE001 -- report and go on to the next job
        ok = False
        import traceback
        traceback.print_exc()
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
print("cuda", torch.cuda.is_available(), "ALL OK" if ok else "FAILURES")
sys.exit(0 if ok else 1)
