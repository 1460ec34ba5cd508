"""Every command line the README and experiments/README.md show runs, demo-sized, through its
real entry point, so that none can rot again.

The commands are read from the fenced ```bash blocks of the two READMEs (continuation lines
joined, comments dropped). Each must have an entry in COMMANDS, keyed by the command exactly as
the README writes it: the entry says which arguments shrink it to a demo size (token
replacements and extra flags), which other README commands must run first (their outputs are
its inputs), and what it must write. A README command without an entry fails
`test_every_readme_command_has_an_entry`, so a new command gets a test here.

The training command lines are dry runs unless IFADIT_README_TRAIN=1 (compiling a training
step of the whole model takes minutes on two cores): the real flag and config parsing and the
real `train.setup` (networks, loss networks and data loaded from the files they name), all but
the compiled steps.

All commands run in one sandbox folder that looks like a user's working folder: the official
files the commands name are the test fixtures under the same names (official formats, random
weights), the datasets are a few tiny folders made here (no FFHQ, CelebA-HQ or LFW can exist on
CI), and `ports/`, `configs/` link to the checkout. Python entry points run in-process (runpy, as
`python -m` / `python FILE` would, with sys.argv set and SystemExit caught), so they share JAX's
compiled programs; outputs a command needs from an earlier one are produced once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import runpy
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, fixture

READMES = ("README.md", "experiments/README.md")

# The sandbox's files under the names the README commands use -> the test fixture behind each.
OFFICIAL = {
    "attr_best.pth": "ifadit_attr_best.pth", "mlp_best.pth": "ifadit_mlp_latent_mapper.pth",
    "G_net_15.pth": "ifadit_inn_G_net.pth", "fuse_mlp_15.pth": "ifadit_icl_fusion_mapper10.pth",
    "550000.pt": "ifadit_stylegan2_256_style512.pt", "model_ir_se50.pth": "ifadit_model_ir_se50.pth",
    "79999_iter.pth": "bisenet_faceparsing.pth",
}
FILES = {
    **{f"official/{name}": src for name, src in OFFICIAL.items()},
    **OFFICIAL,
    "psp_ffhq_encode.pt": "psp_ffhq_encode_256.pt",
    "mobilefacenet_model_best.pth.tar": "mobilefacenet_model_best.pth.tar",
    "alexnet-owt-7be5be79.pth": "lpips_alex_trunk_torchvision.pth",
    "vgg16-397923af.pth": "lpips_vgg16_div8_trunk_torchvision.pth",
    "lpips/weights/v0.1/alex.pth": "lpips_weights/v0.1/alex.pth",
    "lpips/weights/v0.1/vgg.pth": "lpips_vgg_div8_lins.pth",
    "adaface_ir50_ms1mv2.ckpt": "adaface_ir50_random.ckpt",
    "pt_inception-2015-12-05-6726825d.pth": "pt_inception_fid_random_div4.pth",
    "path/to/facenet_pytorch/data": "mtcnn_weights",
}

# Demo-sized runs: one image per batch and per dataset, two diversity keys, one sample row.
SMALL_TABLES = ("--limit", "1", "--batch", "1", "--div-keys", "2", "--samples", "1")
# One training step of batch 2 on the fixture-width networks, no samples, one checkpoint. Phase 2
# reads the release too ("plus the same ... flags"), hence the conventions.
SMALL_TRAIN = ("--config.nets.conventions=official", "--config.total_steps=1",
               "--config.data.batch_size=2", "--config.data.num_threads=1",
               "--config.data.prefetch_buffer_size=1", "--config.log_every=1",
               "--config.checkpoint_every=1", "--config.sample_every=0")
TRAIN_FILES = ("--config.data.path", "data/ffhq_star", "--config.nets.dir", "weights/",
               "--config.loss_nets.lpips", "lpips_alex.safetensors",
               "--config.loss_nets.landmarks", "mobilefacenet.safetensors")


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one README command runs here.

    name: a short name (for `needs` and test ids); replace: token -> token; add: extra arguments
    (demo size); needs: names of commands whose outputs this one reads; writes: paths it must
    create; instead: the argv to run when the README line is not a Python entry point (`make`),
    with `recipe`: the text the Makefile target must contain for `instead` to be what it runs;
    skip: why it is not run (only `make test`: it is this suite); costly: why it only runs with
    IFADIT_README_TRAIN=1 (otherwise a dry run: `_train_dry_run`).
    """

    name: str
    replace: dict = dataclasses.field(default_factory=dict)
    add: tuple = ()
    needs: tuple = ()
    writes: tuple = ()
    instead: tuple = ()
    recipe: str = ""
    skip: str = ""
    costly: str = ""


# Compiling one training step of the fixture-width networks takes minutes on CI's two cores.
TRAIN_COST = "compiling a training step of the whole model takes minutes on two CPU cores"
RUN_COSTLY = os.environ.get("IFADIT_README_TRAIN") == "1"


def _results(name: str) -> dict:
    """Each table command writes into its own folder (the READMEs all say results/)."""
    return {"results/": f"results/{name}/"}


COMMANDS = {c: e for c, e in [
    # ---------------------------------------------------------------- README.md: quickstart
    ("make demo", Entry("make_demo", recipe="$(BIN)/python -m ifadit_jax.demo",
                        skip="tests/test_demo.py runs `python -m ifadit_jax.demo` (what the "
                             "recipe runs) and checks its grid and report; running it twice "
                             "would compile the demo twice")),
    ("make test", Entry("make_test", recipe="$(BIN)/python -m pytest",
                        skip="it runs the test suite this test belongs to")),
    # ---------------------------------------------------------------- anonymize and recover
    ("python -m ifadit_jax.anonymize photo.jpg anon.png --weights weights/ --secret-file my.secret",
     Entry("anonymize", needs=("release", "mtcnn_weights"), writes=("anon.png", "anon.png.json"))),
    ("python -m ifadit_jax.recover anon.png recovered.png --weights weights/ --secret-file my.secret",
     Entry("recover", needs=("anonymize",), writes=("recovered.png",))),
    ("python -m ifadit_jax.anonymize clip.mp4 out.mkv --weights weights/ --secret-file my.secret",
     Entry("anonymize_video", needs=("release", "mtcnn_weights"), writes=("out.mkv", "out.mkv.json"))),
    ("python -m ifadit_jax.recover out.mkv recovered.mkv --weights weights/ --secret-file my.secret",
     Entry("recover_video", needs=("anonymize_video",), writes=("recovered.mkv",))),
    # ---------------------------------------------------------------- converters
    ("python ports/convert_ifadit.py release official/ weights/",
     Entry("release", writes=("weights/manifest.json", "weights/stylegan2.safetensors"))),
    ("python ports/convert_mtcnn.py path/to/facenet_pytorch/data weights/mtcnn.safetensors",
     Entry("mtcnn_weights", needs=("release",), writes=("weights/mtcnn.safetensors",))),
    # The single-network converters write next to the release's files in the README; here into
    # single/ so that they do not collide with it.
    *[(f"python ports/{script} {args} weights/{out}",
       Entry(f"single_{out.split('.')[0]}", replace={f"weights/{out}": f"single/{out}"},
             writes=(f"single/{out}",)))
      for script, args, out in [
          ("convert_ifadit.py", "inn G_net_15.pth", "sif.safetensors"),
          ("convert_ifadit.py", "mapper mlp_best.pth", "latent_mapper.safetensors"),
          ("convert_ifadit.py", "icl fuse_mlp_15.pth", "icl.safetensors"),
          ("convert_arcface.py", "model_ir_se50.pth", "arcface.safetensors"),
          ("convert_psp.py", "attr_best.pth", "psp_encoder.safetensors"),
          ("convert_bisenet.py", "79999_iter.pth", "bisenet.safetensors"),
          ("convert_stylegan2.py", "550000.pt", "stylegan2.safetensors")]],
    ("python ports/convert_psp.py psp_ffhq_encode.pt psp.safetensors",
     Entry("psp", writes=("psp.safetensors",))),
    ("python ports/convert_mobilefacenet.py mobilefacenet_model_best.pth.tar mobilefacenet.safetensors",
     Entry("mobilefacenet", writes=("mobilefacenet.safetensors",))),
    ("python ports/convert_lpips.py --net alex --trunk alexnet-owt-7be5be79.pth "
     "--lin lpips/weights/v0.1/alex.pth lpips_alex.safetensors",
     Entry("lpips_alex", writes=("lpips_alex.safetensors",))),
    ("python ports/convert_lpips.py --net vgg --trunk vgg16-397923af.pth "
     "--lin lpips/weights/v0.1/vgg.pth lpips_vgg.safetensors",
     Entry("lpips_vgg", writes=("lpips_vgg.safetensors",))),
    ("python ports/convert_adaface.py adaface_ir50_ms1mv2.ckpt adaface.safetensors",
     Entry("adaface", writes=("adaface.safetensors",))),
    ("python ports/convert_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors",
     Entry("inception", writes=("fid_inception.safetensors",))),
    # ---------------------------------------------------------------- data and training
    ("python -m ifadit_jax.data.synthesize --weights weights/stylegan2.safetensors --n 70000 "
     "--out data/ffhq_star --truncation 0.7",
     # 5 images: the 10% validation split holds one
     Entry("synthesize", replace={"70000": "5"}, add=("--batch", "5", "--quiet"), needs=("release",),
           writes=("data/ffhq_star/meta.json", "data/ffhq_star/images/000004.png"))),
    ("python -m ifadit_jax.data.tfds_builder data/ffhq_star data/tfds",
     Entry("tfds", needs=("synthesize",), writes=("data/tfds",))),
    ("python -m ifadit_jax.train --phase 1 --config configs/phase1.py --workdir runs/p1 "
     "--config.data.path data/ffhq_star --config.nets.dir weights/ "
     "--config.nets.conventions=official "
     "--config.loss_nets.lpips lpips_alex.safetensors "
     "--config.loss_nets.landmarks mobilefacenet.safetensors",
     Entry("train_p1", add=SMALL_TRAIN, costly=TRAIN_COST,
           needs=("synthesize", "release", "lpips_alex", "mobilefacenet"),
           writes=("runs/p1/weights/manifest.json",))),
    ("python -m ifadit_jax.train --phase 2 --config configs/phase2.py --workdir runs/p2 "
     "--config.init_from runs/p1",
     # "plus the same data / nets / loss_nets flags", as the README's comment says
     Entry("train_p2", add=TRAIN_FILES + SMALL_TRAIN, costly=TRAIN_COST, needs=("train_p1",),
           writes=("runs/p2/weights/manifest.json",))),
    # ---------------------------------------------------------------- experiments (README.md)
    ("python -m experiments.run all --weights weights/ --images celebahq=data/celebahq "
     "--metrics metrics/ --out results/",
     Entry("all", replace=_results("all"), add=SMALL_TABLES, needs=("release", "metrics"),
           writes=tuple(f"results/all/table{i}.md" for i in range(1, 5)))),
    ("python -m experiments.run table2 --weights weights/ --images lfw=data/lfw --align "
     "--metrics metrics/ --out results/",
     Entry("table2_lfw", replace=_results("table2_lfw"), add=SMALL_TABLES, needs=("release", "metrics"),
           writes=("results/table2_lfw/table2.json",))),
    ("python -m experiments.run table5 --ablation full=A --ablation no_div=B --ablation no_img=C "
     "--ablation no_icl=D --ablation single_phase=E --images ffhq_star=data/ffhq_star --split val "
     "--out results/",
     Entry("table5_short", replace={**_results("table5_short"), "full=A": "full=runs/p2/weights",
                                    **{f"{v}={x}": f"{v}=runs/{v}/weights" for v, x in
                                       [("no_div", "B"), ("no_img", "C"), ("no_icl", "D"),
                                        ("single_phase", "E")]}},
           add=SMALL_TABLES, needs=("train_p2", "synthesize", "ablation_folders"),
           writes=("results/table5_short/table5.csv",))),
    ("python -m experiments.run all --demo --out out/experiments",
     Entry("all_demo", add=("--limit", "2", "--batch", "2", "--div-keys", "2", "--samples", "1"),
           writes=tuple(f"out/experiments/table{i}_samples.png" for i in range(1, 5)))),
    ("python -m experiments.run video --weights weights/ --videos clips/ --out results/",
     Entry("video_exp", replace={**_results("video_exp"), "clips/": "clip.mp4"}, add=("--crf", "28", "--quiet"),
           needs=("release", "mtcnn_weights"), writes=("results/video_exp/video.csv",))),
    ("python -m experiments.run video --demo --out out/video",
     Entry("video_demo", skip="tests/test_video_experiment.py runs it (with --crf 28) and checks "
                              "its numbers; running it twice would compile it twice")),
    # ---------------------------------------------------------------- experiments/README.md
    *[(f"python -m experiments.run table{i} --weights weights/ --images {d}=data/{d} --out results/ "
       "--metrics metrics/",
       Entry(f"table{i}", replace=_results(f"table{i}"), add=SMALL_TABLES, needs=("release", "metrics"),
             writes=(f"results/table{i}/table{i}_samples.png",)))
      for i, d in [(1, "celebahq"), (2, "ffhq"), (3, "celebahq"), (4, "celebahq")]],
    ("python -m experiments.run all --weights weights/ --images celebahq=data/celebahq "
     "--images ffhq=data/ffhq --metrics metrics/ --out results/",
     Entry("all_two", replace=_results("all_two"), add=SMALL_TABLES, needs=("release", "metrics"),
           writes=("results/all_two/table1.csv",))),
    ("python -m experiments.run table5 --ablation full=runs/p2/weights --ablation no_div=runs/no_div/weights "
     "--ablation no_img=runs/no_img/weights --ablation no_icl=runs/no_icl/weights "
     "--ablation single_phase=runs/single_phase/weights --images ffhq_star=data/ffhq_star --split val "
     "--out results/ --metrics metrics/",
     Entry("table5", replace=_results("table5"), add=SMALL_TABLES,
           needs=("train_p2", "synthesize", "ablation_folders", "metrics"),
           writes=("results/table5/table5.md",))),
    ("mkdir -p metrics", Entry("mkdir_metrics", writes=("metrics",))),
    ("python ports/convert_adaface.py adaface_ir50_ms1mv2.ckpt metrics/adaface.safetensors",
     Entry("metrics_adaface", needs=("mkdir_metrics",), writes=("metrics/adaface.safetensors",))),
    ("python ports/convert_lpips.py --net alex --trunk alexnet-owt-7be5be79.pth "
     "--lin lpips/weights/v0.1/alex.pth metrics/lpips_alex.safetensors",
     Entry("metrics_lpips", needs=("mkdir_metrics",), writes=("metrics/lpips_alex.safetensors",))),
    ("python ports/convert_inception.py pt_inception-2015-12-05-6726825d.pth metrics/fid_inception.safetensors",
     Entry("metrics_inception", needs=("mkdir_metrics",), writes=("metrics/fid_inception.safetensors",))),
    ("python ports/convert_mtcnn.py path/to/facenet_pytorch/data metrics/mtcnn.safetensors",
     Entry("metrics_mtcnn", needs=("mkdir_metrics",), writes=("metrics/mtcnn.safetensors",))),
]}
BY_NAME = {e.name: e for e in COMMANDS.values()}
# Groups of README commands that other commands need together (not README lines themselves).
GROUPS = {"metrics": ("metrics_adaface", "metrics_lpips", "metrics_inception", "metrics_mtcnn")}


def normalize(command: str) -> str:
    return shlex.join(shlex.split(command, comments=True))


def readme_commands(text: str) -> list[str]:
    """The command lines of the fenced bash blocks of a Markdown text, continuation lines
    joined and comments dropped, normalized (one space between arguments)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            command = normalize(pending + line)
            pending = ""
            if command:
                commands.append(command)
    return commands


def all_readme_commands() -> list[str]:
    found = []
    for name in READMES:
        found += [c for c in readme_commands((ROOT / name).read_text()) if c not in found]
    return found


# ----------------------------------------------------------------------------------------------
# The sandbox


def _photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _make_datasets(root: Path) -> None:
    """Tiny stand-ins for the datasets: aligned faces (CelebA-HQ, FFHQ layouts) and LFW-style
    photos in a person folder."""
    from experiments import evaluate as ev

    faces = [np.asarray(np.clip(f, 0, 1) * 255 + 0.5, np.uint8) for f in ev.demo_faces(2)]
    for d, name in (("celebahq", "{i}.jpg"), ("ffhq", "0000{i}/0000{i}.png")):
        for i, face in enumerate(faces):
            path = root / "data" / d / name.format(i=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face).save(path, quality=95)
    person = root / "data" / "lfw" / "Eileen_Collins"
    person.mkdir(parents=True)
    Image.fromarray(_photo()[20:270, 90:340]).save(person / "Eileen_Collins_0001.jpg", quality=95)


def _make_clip(path: Path) -> None:
    """Six H.264 frames panning over the photo's face (the video README's clip.mp4)."""
    import av

    photo = _photo()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 96, 128, "yuv420p"
        for i in range(6):
            crop = photo[10:310, 40 + 8 * i:440 + 8 * i]
            frame = np.asarray(Image.fromarray(crop).resize((128, 96), Image.BILINEAR))
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def _make_sandbox(root: Path) -> None:
    for rel, src in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(fixture(src), root / rel)
    for name in ("ports", "configs"):
        os.symlink(ROOT / name, root / name)
    for folder in ("single", "results", "out", "runs"):
        (root / folder).mkdir()
    Image.fromarray(_photo()).save(root / "photo.jpg", quality=95)
    _make_clip(root / "clip.mp4")
    (root / "my.secret").write_text("correct horse battery staple\n")
    _make_datasets(root)


def _make_ablation_folders(root: Path) -> None:
    """runs/<ablation>/weights as the training runs would export them: copies of the converted
    release (no_icl without icl.safetensors); `full` is the phase 2 run's own export."""
    for variant in ("no_div", "no_img", "no_icl", "single_phase"):
        dst = root / "runs" / variant / "weights"
        shutil.copytree(root / "weights", dst)
        (dst / "mtcnn.safetensors").unlink(missing_ok=True)
        if variant == "no_icl":
            (dst / "icl.safetensors").unlink()


@dataclasses.dataclass
class Outcome:
    code: int
    output: str


def _run_python(argv: list[str]) -> int:
    """`python -m MODULE ARGS` or `python FILE ARGS` in this process; returns the exit code."""
    module = argv[1] == "-m"
    target, args = (argv[2], argv[3:]) if module else (argv[1], argv[2:])
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules"
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _train_dry_run(argv: list[str]) -> int:
    """A training command line through the real flag parsing and config checks of
    `ifadit_jax.train.main` and the real `train.setup` (every network and loss network loaded
    and validated from the files the command names, the data pipeline opened, the state built),
    with only the compiled steps left out; its export is stood in for by a copy of the converted
    release (what Table 5 reads)."""
    from ifadit_jax import cli, train
    from ifadit_jax.training import step as step_lib

    seen = {}

    def setup_only(config, workdir):
        seen.update(c=config, w=workdir)
        run = train.setup(config, workdir)
        # The untrained state as the finished checkpoint a later phase's init_from reads.
        run.ckpts.save(0, step_lib.unreplicate(run.state), run.data_it)
        run.ckpts.wait()
        run.ckpts.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_and_evaluate", setup_only)
        # ml_collections finds the --config.FIELD overrides in sys.argv, not in main's argv
        mp.setattr(sys, "argv", argv[2:])
        try:
            cli.run(train.main, argv[3:])
        except SystemExit as e:
            if e.code:
                return e.code
    config = seen["c"]
    for path in (config.data.path, config.nets.dir, config.init_from or "."):
        assert os.path.isdir(path), f"{path} is not a folder"
    for path in (config.loss_nets.lpips, config.loss_nets.landmarks):
        assert os.path.isfile(path), f"{path} is not a file"
    shutil.copytree("weights", os.path.join(seen["w"], "weights"),
                    ignore=shutil.ignore_patterns("mtcnn.safetensors"))
    print("dry run: flags, files and setup checked; IFADIT_README_TRAIN=1 trains for real")
    return 0


class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Outcome] = {}
        self.commands = {e.name: c for c, e in COMMANDS.items()}

    def argv(self, command: str, entry: Entry) -> list[str]:
        if entry.instead:
            return list(entry.instead)
        return [entry.replace.get(a, a) for a in shlex.split(command)] + list(entry.add)

    def run(self, name: str) -> Outcome:
        """Runs command `name` (after what it needs) once; its exit code and output."""
        if name in self.done:
            return self.done[name]
        if name in GROUPS or name == "ablation_folders":
            for part in GROUPS.get(name, ("release", "train_p2")):
                self.require(part)
            if name == "ablation_folders":
                _make_ablation_folders(self.root)
            self.done[name] = Outcome(0, "")
            return self.done[name]
        entry = BY_NAME[name]
        for need in entry.needs:
            self.require(need)
        argv = self.argv(self.commands[name], entry)
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if argv[0] == "mkdir":
                    os.makedirs(argv[-1], exist_ok=True)
                    code = 0
                elif entry.costly and not RUN_COSTLY:
                    code = _train_dry_run(argv)
                else:
                    code = _run_python(argv)
        finally:
            os.chdir(cwd)
        self.done[name] = Outcome(code, out.getvalue())
        return self.done[name]

    def require(self, name: str) -> None:
        outcome = self.run(name)
        if outcome.code != 0:
            pytest.fail(f"README command {name!r}, needed here, failed ({outcome.code}):\n"
                        f"{outcome.output[-3000:]}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme") / "work"
    root.mkdir()
    _make_sandbox(root)
    return Sandbox(root)


# ----------------------------------------------------------------------------------------------
# Tests


def test_readme_commands_are_found():
    """The extraction itself, on a hand-written block: continuation lines, comments, blanks."""
    text = ("text\n```bash\npython a.py x \\\n    --y 1   # a comment\n\nmake demo  # c\n```\n"
            "```python\nnot = 'a command'\n```\n```bash\npython -m b 'two words'\n```\n")
    assert readme_commands(text) == ["python a.py x --y 1", "make demo", "python -m b 'two words'"]


def test_every_readme_command_has_an_entry():
    commands = all_readme_commands()
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, ("README commands without an entry in tests/test_readme_commands.py "
                         f"COMMANDS (add one, demo-sized): {missing}")
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no README shows any more (remove them): {stale}"
    for entry in COMMANDS.values():
        assert set(entry.needs) <= set(BY_NAME) | set(GROUPS) | {"ablation_folders"}, entry.name


@pytest.mark.xdist_group("readme_commands")
@pytest.mark.parametrize("command", all_readme_commands())
def test_readme_command_runs(sandbox, command):
    entry = COMMANDS.get(command)
    if entry is None:
        pytest.fail(f"no COMMANDS entry for {command!r}")
    if entry.recipe:
        assert entry.recipe in (ROOT / "Makefile").read_text(), (
            f"the Makefile no longer runs {entry.recipe!r} for {command!r}")
    if entry.skip:
        pytest.skip(entry.skip)
    outcome = sandbox.run(entry.name)
    assert outcome.code == 0, f"{command}\n(ran as {sandbox.argv(command, entry)})\n{outcome.output[-4000:]}"
    assert "Traceback" not in outcome.output, outcome.output[-4000:]
    for rel in entry.writes:
        assert (sandbox.root / rel).exists(), f"{command} did not write {rel}"
