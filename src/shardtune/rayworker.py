"""The worker side of a Ray Train run: how the loop (engine.py) reports to Ray, and which
checkpoint it resumes from.

A checkpoint is *committed* once every rank has uploaded its part into the run's storage:
the ranks meet in a collective on the training device, then rank 0 writes the marker
(rundir.COMMITTED). That happens inside ray.train.report, before the report is queued for
Ray's controller, which takes one report per poll (every 2 s) and only then records the
checkpoint in its snapshot. A driver killed in between (a second Ctrl-C, SIGKILL, a lost
head node) used to leave a whole checkpoint that Ray's snapshot did not name, and the run
was thrown away as one "interrupted before the first checkpoint". Now the driver
(rundir.has_checkpoint) and the resume (latest_checkpoint) also count committed folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from shardtune import rundir
from shardtune.engine import train_worker
from shardtune.reports import Kind, Report


class RayReporter:
    def __init__(self, stop_file: str):
        self.stop_file = Path(stop_file)

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def node(self) -> str:
        import ray.util

        return ray.util.get_node_ip_address()

    def device(self):
        """The GPU Ray assigned this worker (it sets CUDA_VISIBLE_DEVICES per worker, so
        LOCAL_RANK need not be its index), or the CPU."""
        import ray.train.torch

        return ray.train.torch.get_device()

    def report(self, report: Report, checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(report.to_metrics())
            return
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        if report.kind is Kind.FINAL:  # rank 0 alone hands over the finished run: nothing to meet for
            ray.train.report(report.to_metrics(), checkpoint=checkpoint)
            return
        ray.train.report(report.to_metrics(), checkpoint=checkpoint, checkpoint_upload_fn=self._upload_and_commit)

    def _upload_and_commit(self, checkpoint, dir_name: str):
        """Ray's upload (a copy into the run's storage), then the commit: after the collective
        every rank's files are there, and the marker says so."""
        import pyarrow.fs
        import ray.train
        import torch
        import torch.distributed as dist

        context = ray.train.get_context()
        storage = context.get_storage()
        fs, destination = storage.storage_filesystem, f"{storage.experiment_fs_path}/{dir_name}"
        fs.create_dir(destination, recursive=True)
        pyarrow.fs.copy_files(checkpoint.path, destination, source_filesystem=checkpoint.filesystem,
                              destination_filesystem=fs)
        if dist.is_initialized():
            done = torch.ones(1, device=self.device())
            dist.all_reduce(done)  # on the training device: NCCL has no CPU tensors
            done.item()  # NCCL returns before the collective ends; .item() waits for it
        if context.get_world_rank() == 0:
            with fs.open_output_stream(f"{destination}/{rundir.COMMITTED}") as out:
                out.write(f"{context.get_world_size()}\n".encode())
        return ray.train.Checkpoint(destination, filesystem=fs)

    def latest_checkpoint(self, scratch: Path) -> str | None:
        """The checkpoint furthest along: Ray's last recorded one, or a committed one its
        controller never recorded (see the module's docstring).

        Ray's is read in place when the run's storage is a local or shared file system,
        else downloaded into this worker's own scratch folder. Not Checkpoint.to_directory():
        it downloads into one temporary folder per node, and a second worker on the node can
        start downloading again after the first finished, rewriting the files the first is
        loading (seen as a corrupt zip after a SIGKILLed driver's run was resumed)."""
        import pyarrow.fs
        import ray.train

        storage = ray.train.get_context().get_storage()
        local = isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
        on_disk = rundir.newest_committed(Path(storage.experiment_fs_path)) if local else None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return str(on_disk) if on_disk else None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
            if on_disk and rundir.progress(on_disk) > rundir.progress(Path(checkpoint.path)):
                return str(on_disk)
            return checkpoint.path
        return checkpoint.to_directory(str(scratch / "restored"))


def ray_worker(config: dict) -> None:
    train_worker(config["recipe"], RayReporter(config["stop_file"]))
