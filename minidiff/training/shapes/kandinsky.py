"""The shapes world's Kandinsky 2.2: the decoder's starting folder, and what text -> prior -> decoder is worth.

    save_decoder_start   a decoder folder to train from: movq/ (train_movq.py's), scheduler/
                         (kandinsky-2-2-decoder's DDPM config, shipped in minidiff/data/configs)
                         and unet_config.json (configs.DECODER_UNET_CONFIG) for
                         `minidiff train-decoder --unet_config`
    export_decoder       a finished `minidiff train-decoder` run -> the shipped folder: unet/ and
                         movq/ in fp16, scheduler/, a README whose front matter names the prior,
                         recommended_settings.json, training/ (the loss log and summary)
    evaluate_movq        held-out PSNR of MoVQ reconstructions, decoded quantised and as the
                         pipeline decodes (force_not_quantize), and how much of the codebook is used
    evaluate_kandinsky   the judge on >= 200 held-out single-object prompts: text -> prior ->
                         decoder, and the decoder alone from each scene's *true* CLIP image
                         embedding (an upper bound: what a perfect prior would give)

The shapes decoder ships as weights/shapes-decoder (kandinsky-2-2-decoder's layout); its README's
front matter names weights/shapes-prior (kandinsky_decoder.connected_prior), so `AutoPipelineForText2Image.from_pretrained` and
`minidiff generate --model weights/shapes-decoder` run the whole chain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.data import config_folder
from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.training.shapes.configs import DECODER_UNET_CONFIG
from minidiff.training.shapes.data import held_out_scenes, scenes_to_tensor
from minidiff.training.shapes.evaluate import judge_single_objects, mean_psnr
from minidiff.training.shapes.judge import load_judge

# The judge lives with the SD-style shapes model; one judge scores both families.
JUDGE = Path("weights/shapes/judge")


def save_decoder_start(out_dir, components_dir) -> Path:
    out_dir, components_dir = Path(out_dir), Path(components_dir)
    if not (components_dir / "movq" / "config.json").is_file():
        raise InputError(f"{components_dir} has no movq/ (train it first: minidiff train-shapes movq).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{str(out_dir)!r} is not empty; write the decoder's starting folder into a new one.")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(components_dir / "movq", out_dir / "movq")
    shutil.copytree(config_folder("kandinsky-2-2-decoder") / "scheduler", out_dir / "scheduler")
    write_json(DECODER_UNET_CONFIG, out_dir / "unet_config.json")
    return out_dir


def export_decoder(run_dir, out_dir, prior: str = "weights/shapes-prior", settings: dict | None = None,
                   dtype: torch.dtype = torch.float16) -> Path:
    from minidiff.pipelines.kandinsky_decoder import KandinskyV22Pipeline
    from minidiff.pipelines.settings import write_recommended_settings
    from minidiff.training.trainer import save_pipeline

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(p.name != "README.md" for p in out_dir.iterdir()):
        raise InputError(f"{str(out_dir)!r} already holds files; export into a new folder.")
    save_pipeline(out_dir, KandinskyV22Pipeline.from_pretrained(run_dir, torch_dtype=torch.float32).to(dtype))
    if settings:
        write_recommended_settings(settings, out_dir)
    (out_dir / "training").mkdir()
    for name in ("loss_log.json", "training_summary.json"):
        shutil.copy(run_dir / name, out_dir / "training" / name)
    card = out_dir / "README.md"
    if not card.is_file():  # the front matter diffusers' connected pipelines read; the card itself is written by hand
        card.write_text(f"---\nprior:\n- {prior}\n---\n")
    return out_dir


@torch.no_grad()
def evaluate_movq(movq, n: int = 200, batch_size: int = 50) -> dict:
    """PSNR (dB, [0, 1] scale) of held-out reconstructions, quantised and not, and codebook use."""
    x = scenes_to_tensor(held_out_scenes("val", n))  # (n, 3, 128, 128) in [-1, 1]
    movq = movq.cpu().eval()
    quantised, direct, codes = [], [], set()
    for i in range(0, n, batch_size):
        z = movq.encode(x[i:i + batch_size]).latents
        quantised.append(movq.decode(z).sample.clamp(-1, 1))
        direct.append(movq.decode(z, force_not_quantize=True).sample.clamp(-1, 1))
        codes.update(movq.quantize(z)[2][2].tolist())
    return {"psnr_quantised": mean_psnr(torch.cat(quantised), x), "psnr_force_not_quantize": mean_psnr(torch.cat(direct), x),
            "codes_used": len(codes), "codebook": movq.config.num_vq_embeddings, "n": n}


@torch.no_grad()
def evaluate_kandinsky(folder, n: int = 200, steps: int = 50, guidance_scale: float = 4.0, prior_steps: int = 25,
                       prior_guidance_scale: float = 4.0, seed: int = 0, batch_size: int = 25, judge_folder=JUDGE,
                       progress: bool = True) -> dict:
    """Judge colour / shape / both on the first n held-out single-object test prompts, twice:
    `text_prior_decoder` (the combined pipeline, the prior's sample as the embedding) and
    `true_embedding_decoder` (the decoder given the CLIP image embedding of the scene the prompt
    describes). Same seeds (seed + i for the batch starting at prompt i) for both."""
    from minidiff.pipelines.auto import AutoPipelineForText2Image

    judge = load_judge(judge_folder)
    pipe = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = held_out_scenes("test", n, num_objects=1)
    size = pipe.prior_image_encoder.config.image_size
    pairs = {"text_prior_decoder": [], "true_embedding_decoder": []}  # (scene, image (3, H, W)) each
    zero = pipe.prior_pipe.get_zero_embed(1)
    for i in tqdm(range(0, n, batch_size), desc="kandinsky eval", disable=not progress):
        chunk = scenes[i:i + batch_size]
        generated = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                         prior_num_inference_steps=prior_steps, prior_guidance_scale=prior_guidance_scale,
                         height=size, width=size, generator=torch.Generator().manual_seed(seed + i),
                         output_type="np").images
        pixels = pipe.prior_image_processor(images=[s.pil() for s in chunk], return_tensors="pt").pixel_values
        true = pipe.prior_image_encoder(pixels.to(pipe.prior_image_encoder.dtype)).image_embeds.float()
        upper = pipe.decoder_pipe(true, zero.repeat(len(chunk), 1), num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=size, width=size,
                                  generator=torch.Generator().manual_seed(seed + i), output_type="np").images
        for name, images in (("text_prior_decoder", generated), ("true_embedding_decoder", upper)):
            pairs[name] += [(scene, torch.from_numpy(image).permute(2, 0, 1)) for scene, image in zip(chunk, images)]
    out = {name: judge_single_objects(judge, scored) for name, scored in pairs.items()}
    return {**out, "n": n, "steps": steps, "guidance_scale": guidance_scale, "prior_steps": prior_steps,
            "prior_guidance_scale": prior_guidance_scale}
