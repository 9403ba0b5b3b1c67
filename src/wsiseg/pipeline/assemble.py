"""The one assembler of a prediction run: a composed config in, a :class:`~wsiseg.pipeline.result.RunResult` out.

``wsiseg-predict`` and the Python engine (:class:`wsiseg.Segmenter`) are doors onto :func:`run`: it checks the
options, plans the run once (slides, levels, grids, tissue, what resume keeps), builds the data module, module, writer
and trainer from the plan (:func:`assemble`), and runs ``trainer.predict`` (:meth:`Assembly.execute`). The benchmark
times :meth:`Assembly.execute` of the same assembly, with its own prepared module and a tile limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.config import build_trainer
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.plan import RunPlan, slide_identity
from wsiseg.data.validation import check_stride
from wsiseg.errors import NoProcessableSlideError, UserInputError
from wsiseg.options import check_bool, check_option_types, check_required, check_trainer_device
from wsiseg.pipeline.batch_size import resolve_batch_size
from wsiseg.pipeline.result import RunResult
from wsiseg.run_lock import run_folder_lock
from wsiseg.runtimes.files import is_file_network
from wsiseg.writers.options import writer_section_options
from wsiseg.writers.patch_writer import PatchWriter
from wsiseg.writers.postprocess import refresh
from wsiseg.writers.progress import SlideProgress, TileProgressBar
from wsiseg.writers.run_record import RunRecord, check_writable, config_hash, read_complete_report, reported_tiles
from wsiseg.writers.slide_writer import SlideWriter

log = logging.getLogger(__name__)

__all__ = ["Assembly", "assemble", "check_shard", "resume_check", "run", "run_provenance"]


def run(cfg: DictConfig) -> RunResult:
    """Run the prediction ``cfg`` describes (the composed ``predict.yaml``: slides or a patch folder) holding the
    output folder's lock (one run per folder; see :mod:`wsiseg.run_lock`); returns its :class:`RunResult`.

    Raises:
        UserInputError: a bad option, path or checkpoint, before any slide is read (one line naming it).
    """
    check_required(cfg)
    check_writable(str(cfg.writer.output_dir))  # before the lock: an empty path is not the working folder
    output_dir = Path(cfg.writer.output_dir)
    with run_folder_lock(output_dir):
        rows = assemble(cfg).execute()
    return RunResult(output_dir, tuple(rows))


@dataclass(frozen=True)
class Assembly:
    """A run's parts, built from one plan by :func:`assemble`; :meth:`execute` runs them.

    Attributes:
        datamodule: the slide or patch-folder data module, its plan made.
        module: the prepared :class:`~wsiseg.module.SegmentationModule` (on the trainer's device type).
        writer: the slide or patch writer (a Lightning callback of ``trainer``).
        trainer: the Lightning trainer.
        slide_mode: True for slides, False for a patch folder.
    """

    datamodule: Any
    module: Any
    writer: Any
    trainer: Any
    slide_mode: bool

    @property
    def tiles(self) -> int:
        """Tiles (slide mode) or images (patch mode) this run predicts."""
        plan = self.datamodule.plan
        return int(plan.tiles) if self.slide_mode else len(plan.todo)

    def execute(self) -> list[dict[str, Any]]:
        """Run ``trainer.predict`` (once per assembly); returns the result rows (one per slide or image: ``status``
        ``complete``, ``skipped`` or ``failed``; the reasons are in ``summary.json``)."""
        if self.slide_mode and self.datamodule.plan.tiles == 0:
            # No tissue anywhere, or everything resumed: Lightning would run no hooks, so write the outputs directly.
            if self.trainer.global_rank == 0:
                self.writer.write_without_tiles()
        else:
            try:
                self.trainer.predict(self.module, datamodule=self.datamodule, return_predictions=False)
            except SystemExit as exc:
                self._after_failure(exc)
                if self.trainer.interrupted:  # Lightning: Ctrl-C -> sys.exit(1) after its callbacks' on_exception
                    raise KeyboardInterrupt from None
                raise
            except BaseException as exc:
                self._after_failure(exc)
                raise
        return list(self.writer.results)

    def _after_failure(self, exc: BaseException) -> None:
        """Let the writer record the stop if Lightning's exception handling did not reach it (see
        :meth:`wsiseg.writers.slide_writer.SlideWriter.after_failure`)."""
        after = getattr(self.writer, "after_failure", None)
        if after is not None:
            after(exc)


def assemble(cfg: DictConfig, *, module: Any = None, first_tiles: int | None = None) -> Assembly:
    """Check ``cfg`` (the composed ``predict.yaml``), plan the run and build its parts from the plan.

    Cheap checks come first (required keys, option types, the device, patch size vs the network's stride, writer
    options), then the model is built and the checkpoint loaded, then slides are opened and tiled.

    Args:
        cfg: the run's config.
        module: a module already built and prepared for this trainer's device (the benchmark's, compiled once and
            timed on its own): used as it is instead of ``cfg.model``.
        first_tiles: slide mode: keep only the first N tissue tiles of the run (slide order, then raster order).

    Raises:
        UserInputError: a bad option, path or checkpoint (one line naming it).
    """
    check_required(cfg)
    check_bool(cfg, "resume")
    check_option_types(cfg, ("data", "writer", "model", "model.net", "trainer"))
    check_writable(str(cfg.writer.output_dir))
    check_trainer_device(cfg)
    slide_mode = _check_mode_pairing(cfg)
    # before any slide is opened: a network class's own stride (an exported file's is known once its sidecar is read)
    _check_patch_size(cfg, int(getattr(get_class(cfg.model.net._target_), "stride", 1)))
    run_config = OmegaConf.to_container(cfg, resolve=True)
    provenance = run_provenance(cfg)
    writer_options = OmegaConf.to_container(cfg.writer, resolve=True)
    output_dir = Path(cfg.writer.output_dir)
    if slide_mode:  # checked early
        render = writer_section_options(writer_options).render
        keep = resume_check(output_dir, run_config) if cfg.get("resume") else None
        datamodule = instantiate(cfg.data, _partial_=True)(keep_complete=keep)  # a callable: not through OmegaConf
    else:
        outputs = PatchWriter.outputs_for(run_config=run_config, **_without(writer_options, "_target_"))
        keep = outputs.is_complete if cfg.get("resume") else None
        datamodule = instantiate(cfg.data, _partial_=True)(keep_complete=keep, outputs_of=outputs.written)
    prepared = module is not None
    module = module if prepared else instantiate(cfg.model)
    _check_patch_size(cfg, module.stride)
    # Opens and tiles the slides, or reads the images' headers: the plan every part gets through its constructor.
    try:
        plan = datamodule.plan_run() if slide_mode else datamodule.plan_run(module.stride)
    except NoProcessableSlideError as exc:
        if len(exc.failed) == 1:
            raise
        record = RunRecord(output_dir, run_config, provenance)  # every slide's reason, where a script finds it
        record.start(RunPlan(failed=tuple((Path(str(p)), r) for p, r in exc.failed)))
        record.write_summary()
        reasons = output_dir / "summary.json"
        raise NoProcessableSlideError(f"{exc}; every slide's reason: {reasons}", exc.failed) from None
    if slide_mode and first_tiles is not None:
        datamodule.keep_first_tiles(first_tiles)
        plan = datamodule.plan
    if not slide_mode:
        _refuse_foreign_outputs(outputs.foreign([plan.images[i] for i in plan.todo]), output_dir)
    if not prepared and str(cfg.model.get("runtime")) == "openvino_int8":
        provenance = {**provenance, "int8": _quantise_for_run(cfg, module, datamodule, slide_mode, output_dir)}
    writer = instantiate(cfg.writer, _partial_=True)(plan=plan, run_config=run_config, provenance=provenance)
    # slide mode: the data module hands each DDP rank its share itself (data.shard), so Lightning's sampler stays out
    callbacks: list[Any] = [writer]
    if slide_mode:  # under DDP, rank 0's bar also counts the slides every rank has written
        callbacks.append(SlideProgress([output_dir / slide.name for slide in plan.slides]))
        if cfg.trainer.get("enable_progress_bar", True):  # the bar in tiles, with rate and ETA
            callbacks.append(TileProgressBar([slide.name for slide in plan.slides]))
    no_sampler = {"use_distributed_sampler": False} if slide_mode else {}
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, **no_sampler)
    if slide_mode and trainer.world_size > 1:
        check_shard(plan, trainer.world_size)
    if not slide_mode and trainer.world_size > 1:
        raise UserInputError(
            f"patch mode (data=patches) runs on one device, the trainer has {trainer.world_size}: "
            "set trainer.devices=1 (or trainer=gpu / trainer=cpu)"
        )
    datamodule = datamodule.with_batch_size(
        resolve_batch_size(datamodule.batch_size, module, datamodule.patch_size, trainer.strategy.root_device, trainer)
    )
    # compile=auto weighs the whole run's slide tiles, resumed ones included (so a resumed run compiles, or not, as the
    # uninterrupted run did: compiled and eager outputs may differ by a grey level); patch pieces come in several
    # shapes, each a recompilation, so patch mode is not weighed.
    whole_run = plan.tiles + reported_tiles(output_dir, [name for _, name in plan.resumed]) if slide_mode else None
    if not prepared:
        module.prepare(trainer.strategy.root_device.type, planned_tiles=whole_run, precision=str(trainer.precision))
    if slide_mode and trainer.global_rank == 0:
        for _, name in plan.resumed:  # kept masks: other post-processing options are applied to them, no network
            refresh(output_dir / name, render, run_config)
    return Assembly(datamodule, module, writer, trainer, slide_mode)


def _quantise_for_run(
    cfg: DictConfig, module: Any, datamodule: Any, slide_mode: bool, output_dir: Path
) -> dict[str, Any] | None:
    """``model.runtime=openvino_int8``: quantise the network on the planned tiles and hand the module its runtime
    (:func:`wsiseg.pipeline.int8.prepare_int8`); returns the outcome for the reports (None: no tile to predict).

    Raises:
        UserInputError: patch mode, or a trainer that does not run on the CPU.
    """
    if not slide_mode:
        raise UserInputError(
            "model.runtime=openvino_int8 calibrates on the run's slide tiles (slide mode); for data=patches export an "
            "INT8 network (wsiseg-export export.format=openvino export.quantize=int8) and run it with model=openvino"
        )
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
        raise UserInputError("model.runtime=openvino_int8 runs on the CPU: add trainer=cpu (or trainer=ddp_cpu)")
    if datamodule.plan.tiles == 0:
        return None
    from wsiseg.pipeline.int8 import prepare_int8

    threshold = float(OmegaConf.select(cfg, "writer.threshold", default=0.5))
    return prepare_int8(module, datamodule, module.int8, output_dir, threshold).as_report()


def _refuse_foreign_outputs(foreign: list[Path], output_dir: Path) -> None:
    """Patch mode never overwrites a file it did not write (``writer.output_dir`` = ``data.input_dir`` would write
    ``case1_mask.png`` over the user's ground truth of that name).

    Raises:
        UserInputError: naming the first such file and how many there are.
    """
    if foreign:
        raise UserInputError(
            f"writer.output_dir '{output_dir}' holds '{foreign[0]}' ({len(foreign)} such file(s)), which this run "
            "would overwrite and wsiseg did not write: choose another writer.output_dir"
        )


def _without(options: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in keys}


def _check_mode_pairing(cfg: DictConfig) -> bool:
    """True for slide mode, False for patch mode; UserInputError when ``data`` and ``writer`` are of different modes."""
    slide_data = get_class(cfg.data._target_) is SlideTileDataModule
    slide_writer = get_class(cfg.writer._target_) is SlideWriter
    if slide_data and not slide_writer:
        raise UserInputError(
            "writer=patches writes patch-folder outputs but data=slides reads slides: add data=patches"
        )
    if slide_writer and not slide_data:
        raise UserInputError("data=patches needs the patch writer: add writer=patches to the command line")
    return slide_data


def _check_patch_size(cfg: DictConfig, stride: int) -> None:
    if cfg.data.get("patch_size"):
        check_stride(int(cfg.data.patch_size), stride)


def resume_check(output_dir: Path, run_config: dict[str, Any]) -> Callable[[str, Path], bool]:
    """``resume=true``: whether ``output_dir/<name>`` holds complete outputs of the slide file at ``path`` for this
    config (another slide with the same name, or the same path rewritten since, is redone)."""
    expected = config_hash(run_config)

    def complete(name: str, path: Path) -> bool:
        identity = slide_identity(path) if path.is_file() else {"path": str(path)}
        return read_complete_report(output_dir / name, expected, identity) is not None

    return complete


def check_shard(plan: RunPlan, world: int) -> None:
    """Every DDP rank must get tiles to predict (Lightning runs no hooks on a rank without any, and the others would
    wait for it): refuse a plan that leaves one idle, naming the option to change."""
    mode = plan.shard_mode(world)
    idle = [rank for rank in range(world) if not plan.tiles_of_rank(rank, world)]
    if idle and plan.tiles:
        if mode == "slides":
            raise UserInputError(
                f"data.shard=slides: {sum(1 for s in plan.slides if s.tiles_tissue)} slide(s) with tissue for {world} "
                "ranks leave rank(s) "
                + ", ".join(map(str, idle))
                + " without work: use data.shard=tiles (or auto), or "
                "fewer trainer.devices"
            )
        raise UserInputError(
            f"{plan.tiles} tile(s) for {world} ranks leave rank(s) {', '.join(map(str, idle))} without work: use fewer "
            "trainer.devices"
        )
    log.info("DDP over %d ranks: data.shard=%s -> %s", world, plan.shard, mode)


def run_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What produced a run's outputs, for ``report.json``: library versions and the weights file with its SHA-256
    (the ONNX file for ``model/net=onnx``; ``random`` for untrained weights)."""
    from importlib.metadata import version

    import lightning

    from wsiseg._version import __version__
    from wsiseg.provenance import sha256_file

    model = cfg.model
    weights = model.net.get("path") if is_file_network(get_class(model.net._target_)) else model.get("checkpoint")
    path = Path(str(weights)).expanduser() if weights else None
    return {
        "wsiseg_version": __version__,
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "openslide_version": version("openslide-python"),
        "weights": None if weights is None else str(path.absolute() if path and path.is_file() else weights),
        "weights_sha256": sha256_file(path) if path is not None and path.is_file() else None,
    }
