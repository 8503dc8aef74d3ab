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


def pack(recipe: Recipe, folder: Path, output_dir_as_written: str, roots: list[Path]) -> list[tuple[str, int]]:
    """Write the recipe and its local files into `folder` (the job's working_dir); returns
    what will be uploaded, as (path in the job, bytes).

    Only regular files under `roots` (the recipe's folder, the current directory, and
    folders the user named with --include) are packed: a recipe naming /etc/shadow as its
    data, a model folder holding ~/.ssh, or a symlink pointing out of the packed folder is
    refused, so a submitted job never carries what the user did not mean to send.
    """
    from shardtune.sources import resolve_local

    if not Path(output_dir_as_written).expanduser().is_absolute():
        raise RecipeError("output.dir must be an absolute path on storage the cluster's nodes share: a submitted "
                          "job runs in a temporary working directory that is deleted afterwards")
    packed = recipe.model_copy(deep=True)
    manifest: list[tuple[str, int]] = []
    for name, source in (("train", packed.data.train), ("validation", packed.data.validation)):
        if source is None or source.path.startswith("package:"):
            continue
        local = resolve_local(source.path)
        if local is None or not local.exists():
            continue  # a hub data set: resolved on the cluster
        target = folder / "data" / name / local.name
        manifest += _copy_checked(f"data.{name}.path", local, target, folder, roots)
        source.path = str(target.relative_to(folder))
    model = packed.model.path
    local_model = None if model.startswith("package:") else resolve_local(model)
    if local_model is not None and local_model.exists():
        files = _regular_files("model.path", local_model, roots)
        size = sum(f.stat().st_size for f in files)
        if size > MAX_PACKED_MODEL_BYTES:
            raise RecipeError(f"model.path {model} is {size / 2**30:.1f} GiB, too large to upload with the job; put "
                              "it on storage the cluster sees and name that path, or use a hub id or package:")
        manifest += _copy_checked("model.path", local_model, folder / "model", folder, roots, files)
        packed.model.path = "model"
    (folder / "recipe.yaml").write_text(packed.to_yaml())
    manifest.append(("recipe.yaml", (folder / "recipe.yaml").stat().st_size))
    return manifest


def _regular_files(field: str, path: Path, roots: list[Path]) -> list[Path]:
    """The files under `path` (or path itself), each checked to be a regular file inside a root."""
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise RecipeError(f"{field}: {path} is outside the recipe's folder and the current directory, and "
                          "`shardtune submit` uploads nothing else unless told; add --include "
                          f"{real.parent if real.is_file() else real} if you mean to upload it")
    if real.is_file():
        return [real]
    if not real.is_dir():
        raise RecipeError(f"{field}: {path} is not a regular file or folder; only those are uploaded")
    files = []
    for top, dirs, names in os.walk(real, followlinks=False):
        for entry in [*dirs, *names]:
            item = Path(top) / entry
            if item.is_symlink():
                target = Path(os.path.realpath(item))
                if not target.is_relative_to(real):
                    raise RecipeError(f"{field}: {item} is a symlink to {target}, outside {path}; `shardtune "
                                      "submit` never follows links out of a folder it uploads. Replace the link "
                                      "with the file, or remove it")
                if target.is_dir():
                    continue  # its files are walked where they really are
            if entry in names:
                if not (item.is_file()):
                    raise RecipeError(f"{field}: {item} is not a regular file; remove it from the folder")
                files.append(item)
    return files


def _copy_checked(field: str, source: Path, target: Path, folder: Path, roots: list[Path],
                  files: list[Path] | None = None) -> list[tuple[str, int]]:
    """Copy what _regular_files allows (`files`, when the caller has walked them already)."""
    real = Path(os.path.realpath(source))
    manifest = []
    for item in files if files is not None else _regular_files(field, source, roots):
        # A link inside the folder is uploaded as the file it names, under the link's name.
        dest = target if item == real else target / item.relative_to(real)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, dest)  # contents only: no modes, owners or links travel
        manifest.append((str(dest.relative_to(folder)), dest.stat().st_size))
    return manifest


def describe_upload(manifest: list[tuple[str, int]]) -> str:
    total = sum(size for _, size in manifest)
    lines = [f"uploading {len(manifest)} files, {_size(total)}, with the job:"]
    lines += [f"  {_size(size):>9}  {name}" for name, size in sorted(manifest)]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def submit(recipe_path: Path, overrides: list[str], address: str, *, includes: list[Path] = (),
           dry_run: bool = False, announce=print) -> str | None:
    """Validate, pack, list what is uploaded and submit; returns the job id (None for a dry run)."""
    from shardtune.recipe import apply_overrides, load_raw, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    written = str((apply_overrides(load_raw(recipe_path), overrides).get("output") or {}).get("dir", ""))
    recipe_name = str(recipe_path)
    roots = [Path(os.path.realpath(p)) for p in (recipe_path.parent, Path.cwd(), *includes)]
    with tempfile.TemporaryDirectory(prefix="shardtune-job-") as tmp:
        manifest = pack(recipe, Path(tmp), written, roots)  # recipe problems first: they need no cluster
        announce(describe_upload(manifest))
        if dry_run:
            return None
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
