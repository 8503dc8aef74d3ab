"""`shardtune submit` and `shardtune jobs`: runs on a remote Ray cluster through the Ray Jobs
API (the dashboard's HTTP endpoint, e.g. http://head:8265, or through an SSH tunnel).

A submitted job is `shardtune run recipe.yaml` executed on the cluster's head node in a
working directory Ray uploads: the recipe and the local files it names (data files, and a
local model folder if it is small) are packed into it, with the recipe's paths rewritten to
point at the packed copies. The run's output goes to `output.dir` on the cluster, which must
therefore be an absolute path on storage the cluster's nodes share.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from shardtune.errors import RecipeError, RunError
from shardtune.recipe import Recipe

MAX_PACKED_MODEL_BYTES = 200 * 2**20  # Ray's working_dir upload is meant for code and small files
JOB_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")
METADATA_KEY = "shardtune_recipe"


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError, auth errors
        first = (str(exc).splitlines() or [repr(exc)])[0]
        hints = ["give the dashboard's address (http://HOST:8265, or http://127.0.0.1:PORT through an SSH "
                 "tunnel: ssh -L PORT:127.0.0.1:8265 HEAD)"]
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hints.append("if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token "
                         "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)")
        raise RunError(f"cannot reach the Ray Jobs API at {address} ({first}); " + "; ".join(hints)) from None


def pack(recipe: Recipe, folder: Path, output_dir_as_written: str) -> Path:
    """Write the recipe and its local files into `folder` (the job's working_dir)."""
    from shardtune.sources import resolve_local

    if not Path(output_dir_as_written).expanduser().is_absolute():
        raise RecipeError("output.dir must be an absolute path on storage the cluster's nodes share: a submitted "
                          "job runs in a temporary working directory that is deleted afterwards")
    packed = recipe.model_copy(deep=True)
    data = folder / "data"
    for name, source in (("train", packed.data.train), ("validation", packed.data.validation)):
        if source is None or source.path.startswith("package:"):
            continue
        local = resolve_local(source.path)
        if local is None or not local.exists():
            continue  # a hub data set: resolved on the cluster
        target = data / name / local.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, target)
        else:
            shutil.copy2(local, target)
        source.path = str(target.relative_to(folder))
    model = packed.model.path
    local_model = None if model.startswith("package:") else resolve_local(model)
    if local_model is not None and local_model.exists():
        size = sum(f.stat().st_size for f in local_model.rglob("*") if f.is_file())
        if size > MAX_PACKED_MODEL_BYTES:
            raise RecipeError(f"model.path {model} is {size / 2**30:.1f} GiB, too large to upload with the job; put "
                              "it on storage the cluster sees and name that path, or use a hub id or package:")
        shutil.copytree(local_model, folder / "model")
        packed.model.path = "model"
    (folder / "recipe.yaml").write_text(packed.to_yaml())
    return folder / "recipe.yaml"


def submit(recipe_path: Path, overrides: list[str], address: str) -> str:
    """Validate, pack and submit; returns the job id."""
    from shardtune.recipe import apply_overrides, load_raw, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    written = str((apply_overrides(load_raw(recipe_path), overrides).get("output") or {}).get("dir", ""))
    recipe_name = str(recipe_path)
    with tempfile.TemporaryDirectory(prefix="shardtune-job-") as tmp:
        pack(recipe, Path(tmp), written)  # recipe problems first: they need no cluster
        jobs = client(address)
        env = {k: os.environ[k] for k in JOB_ENV_PASSTHROUGH if k in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        job_id = f"shardtune-{Path(recipe_name).stem}-{uuid.uuid4().hex[:8]}"
        try:
            return jobs.submit_job(
                entrypoint="shardtune run recipe.yaml", submission_id=job_id,
                runtime_env={"working_dir": tmp, "env_vars": env},
                metadata={METADATA_KEY: Path(recipe_name).name, "output_dir": recipe.output.dir})
        except Exception as exc:
            raise RunError(f"the cluster refused the job: {(str(exc).splitlines() or [repr(exc)])[0]}") from None


def follow(address: str, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return str(jobs.get_job_status(job_id).value)


def listing(address: str) -> list[dict]:
    jobs = client(address)
    rows = []
    for job in jobs.list_jobs():
        metadata = job.metadata or {}
        if METADATA_KEY in metadata:
            rows.append({"id": job.submission_id, "status": str(job.status.value), "recipe": metadata[METADATA_KEY],
                         "output_dir": metadata.get("output_dir", ""), "start_time": job.start_time})
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def status(address: str, job_id: str) -> str:
    return str(_known(address, job_id).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return _known(address, job_id).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return _known(address, job_id).stop_job(job_id)


def _known(address: str, job_id: str):
    jobs = client(address)
    try:
        jobs.get_job_info(job_id)
    except Exception:
        raise RunError(f"no job '{job_id}' on the cluster at {address}; `shardtune jobs list --address "
                       f"{address}` shows shardtune's jobs") from None
    return jobs
