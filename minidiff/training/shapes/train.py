"""Command line of the shapes world: train the model family, export it, score it.

    minidiff train-shapes vae  --steps 4000 --batch-size 16      (= python -m minidiff.training.shapes.train ...)
    minidiff train-shapes clip --steps 800 --batch-size 128 --no-hard-negatives   (v1; v3: --init-from, hard negatives)
    minidiff train-shapes unet --steps 7000 --batch-size 32 --resume
    minidiff train-shapes unet --steps 7000 --batch-size 32 --device cuda   (vae, clip, unet: on a GPU)
    minidiff train-shapes unet --init-from weights/shapes/unet --steps 9000 --lr 3e-4 --warmup 100
                                                 (continue an exported UNet: v2's recipe, model card)
    minidiff train-shapes export --out weights/shapes --overwrite
    minidiff train-shapes prior-folder --out DIR     (the shapes CLIP as a prior folder for minidiff train-prior)
    minidiff train-shapes eval --model weights/shapes --n 200        (text-to-image, judged)
    minidiff train-shapes eval-edit --model weights/shapes --n 200   (DiffEdit, judged)
    minidiff train-shapes eval-two-objects --n 200   (text-to-image, two-object prompts, judged)
    minidiff train-shapes eval-edit-outside --n 200  (DiffEdit on scenes drawn with plain PIL, outside.py)
    minidiff train-shapes eval-readme --seeds 10     (the README's edit on seeds 0..9; --blend, default aligned)
    minidiff train-shapes eval-prior --model weights/shapes-prior   (the prior on held-out captions, guidance 1 and 4)
    minidiff train-shapes movq --steps 2500 --batch-size 16      (the Kandinsky decoder's MoVQ, train_movq.py)
    minidiff train-shapes decoder-folder --out DIR   (movq/ + scheduler/ + unet_config.json for minidiff train-decoder)
    minidiff train-shapes eval-decoder --model weights/shapes-decoder   (text -> prior -> decoder, judged)

Train in the order vae, clip, unet (the UNet reads the frozen VAE and text encoder); each writes
its checkpoint and its component to --ckpt-dir (default $SHAPES_CKPT_DIR, else /tmp/shapes_ckpt).
`export` assembles the pipeline folder --out from them (export.py); an existing folder needs
--overwrite, which replaces the pipeline's files and keeps the judge/ and anything else there.
--device (vae, clip, unet; default cpu) is where the loop trains; the random draws stay on the CPU
and the checkpoints hold CPU tensors, so a run can resume on another device (loop.py, "Devices").
A device this machine lacks is refused before any work. benchmarks/gpu_train_shapes.py runs the
whole family on a GPU in one go.
--model is the model folder scored by the eval-* commands and whose judge/ scores the VAE after
`vae`; its default is the relative path weights/shapes, found from the current directory (the
repository root).

Where each job lives: configs.py (the model configs), loop.py (checkpoints, resume, time budget),
train_vae.py, train_clip.py, train_unet.py (the three loops), evaluate.py (held-out scores),
export.py (the pipeline folder), judge.py (the classifier that scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.training.shapes.configs import DEFAULT_CKPT_DIR, PRIOR_CONFIG
from minidiff.training.shapes.evaluate import (
    evaluate_clip,
    evaluate_diffedit,
    evaluate_readme_example,
    evaluate_text_to_image,
    evaluate_two_object_text_to_image,
    evaluate_vae,
)
from minidiff.training.shapes.export import folder_size_mb, save_pipeline
from minidiff.training.shapes.judge import load_judge
from minidiff.training.shapes.loop import training_device
from minidiff.training.shapes.outside import outside_edit_pairs
from minidiff.training.shapes.prior_folder import save_prior_encoders
from minidiff.training.shapes.train_clip import train_clip
from minidiff.training.shapes.train_unet import train_unet
from minidiff.training.shapes.train_vae import train_vae
from minidiff.validation import check_number, check_positive_int

DEFAULT_MODEL = "weights/shapes"  # relative: the bundled model, seen from the repository root


def main(argv=None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["vae", "clip", "unet", "movq", "export", "prior-folder", "decoder-folder",
                                    "eval-decoder", "eval", "eval-edit",
                                    "eval-two-objects", "eval-edit-outside", "eval-readme", "eval-prior"],
                   help="a component to train (vae, clip, unet: in that order), export (assemble the "
                        "diffusers folder --out), prior-folder (the shapes CLIP as the starting folder of "
                        "`minidiff train-prior`, --out, with the shapes prior's prior_config.json), or a judged evaluation: eval (text-to-image), eval-edit "
                        "(DiffEdit), eval-two-objects (two-object text-to-image), eval-edit-outside (DiffEdit "
                        "on scenes drawn outside the generator), eval-readme (the README's edit over --seeds)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--device", default=None,
                   help="vae, clip, unet: where to train, cpu (default), cuda or cuda:N; checkpoints stay CPU tensors")
    p.add_argument("--lr", type=float, default=None, help="vae, clip, unet: peak learning rate (default: the loop's)")
    p.add_argument("--warmup", type=int, default=None, help="vae, clip, unet: warmup steps (default: the loop's)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="unet: training scenes encoded once into the latent pool (default 48000)")
    p.add_argument("--init-from", default=None,
                   help="unet: a UNet folder to start from (e.g. weights/shapes/unet); clip: a model folder "
                        "with text_encoder/ and image_encoder/ (e.g. weights/shapes); instead of random weights")
    p.add_argument("--no-hard-negatives", action="store_true",
                   help="clip: train without the colour-swapped captions (train_clip.py; v1's recipe)")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT_DIR),
                   help="checkpoints and trained components (default $SHAPES_CKPT_DIR or /tmp/shapes_ckpt)")
    p.add_argument("--out", default=None, help="export: the pipeline folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="export: replace the pipeline files of an existing --out folder (its judge/ stays)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the model folder to score, with its judge/ (default {DEFAULT_MODEL}, relative to "
                        f"the current directory)")
    p.add_argument("--n", type=int, default=200, help="evaluation cases")
    p.add_argument("--seeds", type=int, default=10, help="eval-readme: run seeds 0 .. SEEDS-1 (default 10)")
    p.add_argument("--blend", choices=["diffusers", "aligned"], default="aligned",
                   help="eval-readme: the blend of the masked denoising (default aligned, as the README)")
    args = p.parse_args(argv)
    if args.what in ("export", "prior-folder", "decoder-folder") and args.out is None:
        p.error(f"{args.what} needs --out FOLDER, the folder to write")
    if args.what not in ("export", "prior-folder", "decoder-folder") and args.out is not None:
        p.error(f"{args.what} does not write a pipeline folder: --out is export's; the folder to score is --model")
    training = args.what in ("vae", "clip", "unet", "movq")
    if args.device is not None and not training:
        p.error(f"{args.what} runs on the CPU: --device is for the training commands vae, clip and unet")
    device = training_device(args.device or "cpu") if training else None  # refused before any work
    if not training and (args.lr is not None or args.warmup is not None):
        p.error(f"{args.what} trains nothing: --lr and --warmup are for the training commands vae, clip and unet")
    if args.what != "unet" and args.pool_size is not None:
        p.error("--pool-size is the unet command's")
    if args.what not in ("unet", "clip") and args.init_from is not None:
        p.error("--init-from is for the unet and clip commands")
    if args.what != "clip" and args.no_hard_negatives:
        p.error("--no-hard-negatives is the clip command's")
    if args.lr is not None:
        check_number("--lr", args.lr, low=0, low_open=True, why="the peak learning rate")
    if args.warmup is not None:
        check_number("--warmup", args.warmup, low=0, why="steps of linear warmup")
    if args.pool_size is not None:
        check_positive_int("--pool-size", args.pool_size, " of scenes")
    if args.what == "unet" and args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        p.error(f"--init-from {args.init_from}: not a UNet folder (it has no config.json)")
    if args.what == "clip" and args.init_from is not None and not all(
            (Path(args.init_from) / sub / "config.json").is_file() for sub in ("text_encoder", "image_encoder")):
        p.error(f"--init-from {args.init_from}: not a model folder with text_encoder/ and image_encoder/")
    kw = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                            ("warmup", args.warmup)) if v is not None}
    t0 = time.time()
    if args.what == "vae":
        judge = load_judge(Path(args.model) / "judge")  # before training: a missing judge fails now
        vae = train_vae(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
                        device=device, **kw)
        print(json.dumps(evaluate_vae(vae, judge), indent=2))
    elif args.what == "clip":
        clip = train_clip(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
                          device=device, hard_negatives=not args.no_hard_negatives, init_from=args.init_from, **kw)
        print(json.dumps(evaluate_clip(clip), indent=2))
    elif args.what == "unet":
        if args.pool_size is not None:
            kw["pool_size"] = args.pool_size
        train_unet(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
                   device=device, init_from=args.init_from, **kw)
    elif args.what == "movq":
        from minidiff.training.shapes.kandinsky import evaluate_movq
        from minidiff.training.shapes.train_movq import train_movq

        movq = train_movq(args.ckpt_dir, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
                          device=device, **kw)
        print(json.dumps(evaluate_movq(movq), indent=2))
    elif args.what == "decoder-folder":
        from minidiff.training.shapes.kandinsky import save_decoder_start

        save_decoder_start(args.out, args.ckpt_dir)
        print(f"{args.out}: the decoder's starting folder; train with minidiff train-decoder "
              f"--pretrained_decoder_model_name_or_path {args.out} --unet_config {Path(args.out) / 'unet_config.json'} "
              "--pretrained_prior_model_name_or_path weights/shapes-prior --dataset shapes ...")
    elif args.what == "eval-decoder":
        from minidiff.training.shapes.kandinsky import evaluate_kandinsky

        print(json.dumps(evaluate_kandinsky(args.model, n=args.n, seed=args.seed), indent=2))
    elif args.what == "export":
        save_pipeline(args.out, args.ckpt_dir, overwrite=args.overwrite)
        print(f"{args.out}: {folder_size_mb(args.out):.1f} MB (without the judge)")
    elif args.what == "prior-folder":
        save_prior_encoders(args.out, args.ckpt_dir)
        write_json(PRIOR_CONFIG, Path(args.out) / "prior_config.json")
        print(f"{args.out}: the prior's starting folder; train with minidiff train-prior "
              f"--pretrained_prior_model_name_or_path {args.out} --prior_config {Path(args.out) / 'prior_config.json'} ...")
    elif args.what == "eval-prior":
        from minidiff.training.prior import evaluate_shapes_prior

        print(json.dumps(evaluate_shapes_prior(args.model, n=args.n, seed=args.seed), indent=2))
    elif args.what == "eval":
        print(json.dumps(evaluate_text_to_image(args.model, n=args.n), indent=2))
    elif args.what == "eval-edit":
        print(json.dumps(evaluate_diffedit(args.model, n=args.n), indent=2))
    elif args.what == "eval-two-objects":
        print(json.dumps(evaluate_two_object_text_to_image(args.model, n=args.n), indent=2))
    elif args.what == "eval-edit-outside":
        pairs = outside_edit_pairs(args.n, seed=args.seed)
        print(json.dumps(evaluate_diffedit(args.model, pairs=pairs, seed=args.seed), indent=2))
    else:
        print(json.dumps(evaluate_readme_example(args.model, seeds=range(args.seeds), blend=args.blend), indent=2))
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # the user's mistake: one sentence and status 2, as `minidiff train-shapes`
        print(f"python -m minidiff.training.shapes.train: error: {err}", file=sys.stderr)
        sys.exit(2)
