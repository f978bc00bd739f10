"""The shapes world: a procedural captioned dataset, a judge that scores generations, and the
training of a small Stable-Diffusion-style model family on it, one job per file:

    data.py        scenes of coloured shapes with captions and exact masks; held-out sets; edit pairs
    judge.py       a small colour/shape classifier that scores what the pipelines draw
    configs.py     the model configs (VAE, CLIP text and vision, UNet) and SD's schedules
    loop.py        what the training loops share: checkpoints, resume, learning rate, time budget
    train_vae.py   the f=8 autoencoder          train_clip.py   the text encoder (with a vision tower)
    train_unet.py  the text-conditioned UNet    evaluate.py     held-out, judge-scored evaluations
    export.py      the pipeline folder (the diffusers layout) from the trained components
    prior_folder.py  the shapes CLIP as a Kandinsky prior folder (the start of `minidiff train-prior`)
    train.py       the command line: `minidiff train-shapes vae|clip|unet|export|prior-folder|eval...`

Nothing here knows where the repository is: every function takes the folder it reads or writes
(the bundled model is the folder weights/shapes, addressed by path like any other).
"""
