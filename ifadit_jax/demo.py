"""`make demo`: the whole iFADIT pipeline on a real photo, in one PNG grid.

Runs on scikit-image's astronaut photograph (NASA, public domain; it ships inside the
scikit-image package): align the face to the FFHQ crop, anonymize it under three secrets, recover
it with the right secret and with a wrong one, paste each result back, and print the ArcFace
identity cosines and the throughput.

The built-in default has every network at the parity fixtures' small widths with RANDOM weights:
it shows that the machinery runs end to end and how fast, not what a trained model does (its
"faces" are coloured noise, and the grid says so). `--weights DIR` (a folder written by
`python ports/convert_ifadit.py release`) runs the converted official networks instead; with
`DIR/mtcnn.safetensors` the face is detected rather than taken from the landmarks below.

  python -m ifadit_jax.demo [--weights DIR] [--out out/demo.png]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from ifadit_jax import align, cli, commands, imageio, keys, pipeline, random_nets
from ifadit_jax.errors import NoFaceError
from ifadit_jax.files import atomic_path

# MTCNN's five landmarks (eyes, nose, mouth corners) on skimage.data.astronaut(), as the official
# facenet-pytorch detector finds them; used when no detector weights are at hand.
ASTRONAUT_LANDMARKS = np.array([[205.01, 101.73], [246.76, 103.71], [224.67, 128.97],
                                [201.72, 139.25], [245.27, 141.86]])
SECRETS = (b"demo secret one", b"demo secret two", b"demo secret three")
WRONG_SECRET = b"not the secret"
TILE = 256


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut().astype(np.float32) / 255.0


def grid(tiles: list[tuple[str, np.ndarray]], title: str) -> Image.Image:
    top, cap = 22, 16
    canvas = Image.new("RGB", (TILE * len(tiles), TILE + top + cap), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), title, fill="black")
    for i, (label, img) in enumerate(tiles):
        tile = Image.fromarray(imageio.to_uint8(img)).resize((TILE, TILE), Image.LANCZOS)
        canvas.paste(tile, (i * TILE, top))
        draw.text((i * TILE + 6, top + TILE + 2), label, fill="black")
    return canvas


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="weights folder (default: built-in small networks, random weights)")
    p.add_argument("--out", default="out/demo.png")
    p.add_argument("--kdf-memory-kib", type=int, default=keys.KdfParams().memory_cost)
    cli.add_common_arguments(p)
    args = p.parse_args(argv)
    kdf = keys.KdfParams(memory_cost=args.kdf_memory_kib)
    kdf.check_caps()
    cli.setup(args)

    photo = astronaut()
    if args.weights:
        pipe = pipeline.load(args.weights)
        title = f"iFADIT, weights {pipe.weights_id} ({args.weights})"
        has_detector = os.path.isfile(os.path.join(args.weights, commands.DETECTOR_FILE))
    else:
        pipe = random_nets.random_pipeline(seed=0)
        title = "built-in small networks with RANDOM weights (not a trained model): the machinery, not the result"
        has_detector = False
    if has_detector:
        found = commands.detect_faces(commands.load_detector(args.weights), photo)
        if not found:
            raise NoFaceError("the detector found no face in the astronaut photo")
        a = np.asarray(found[0].transform)
    else:
        a = align.crop_transform(ASTRONAUT_LANDMARKS, commands.CROP)
    crop = align.warp_to_crop(photo, a, commands.CROP)[None]

    ks = [pipe.key_from_secret(s, kdf) for s in SECRETS]
    k_wrong = pipe.key_from_secret(WRONG_SECRET, kdf)

    t0 = time.perf_counter()
    results = [pipe.anonymize(crop, k) for k in ks]
    anon = [out for out, _ in results]
    anon[0].block_until_ready()
    compile_s = time.perf_counter() - t0
    rec, _ = pipe.recover(anon[0], ks[0])
    wrong, _ = pipe.recover(anon[0], k_wrong)
    t0 = time.perf_counter()
    pipe.recover(pipe.anonymize(crop, ks[0])[0], ks[0])[0].block_until_ready()
    steady = time.perf_counter() - t0

    ids = {name: np.asarray(pipeline.identity(pipe.nets, img))
           for name, img in [("original", crop), ("anon1", anon[0]), ("anon2", anon[1]),
                             ("anon3", anon[2]), ("recovered", rec), ("wrong key", wrong)]}
    mask = np.asarray(results[0][1]["mask"][0])  # the face region of the original crop
    paste = lambda img: align.paste_back(photo, np.asarray(img[0]), a, mask=mask)  # noqa: E731
    tiles = [("original", photo), ("anonymized, secret 1", paste(anon[0])),
             ("anonymized, secret 2", paste(anon[1])), ("anonymized, secret 3", paste(anon[2])),
             ("recovered (secret 1)", paste(rec)), ("recovered, wrong secret", paste(wrong))]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        grid(tiles, title).save(tmp, format="PNG")

    if not args.quiet:
        report(args.out, title, ids, steady, compile_s, pipe)


def report(out, title, ids, steady, compile_s, pipe) -> None:
    print(f"wrote {out}: {title}")
    print("ArcFace identity cosine with the original face:")
    for name, e in ids.items():
        if name != "original":
            print(f"  {name:10s} {cosine(e, ids['original']):+.3f}")
    print(f"throughput: {1 / steady:.2f} anonymize+recover per second (batch 1, "
          f"{pipe.nets.modules['generator'].config.resolution}px, after {compile_s:.1f} s of compilation)")


if __name__ == "__main__":
    cli.run(main)
