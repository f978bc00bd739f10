"""Training, one job per file:

    prior.py             the Kandinsky 2.2 prior (`minidiff train-prior`, diffusers'
                         train_text_to_image_prior.py written out)
    decoder.py           the Kandinsky 2.2 decoder UNet (`minidiff train-decoder`, diffusers'
                         train_text_to_image_decoder.py written out)
    trainer.py           the loop both share: AdamW, schedules, accumulation, EMA, checkpoints, resume
    min_snr.py           Min-SNR-gamma loss weights for sample, epsilon and v prediction
    checkpoints.py       checkpoint-<step>/ folders: atomic writes, a total limit, "latest" resume,
                         corrupt or partial ones refused
    captioned_images.py  training pairs from an imagefolder (metadata.jsonl), a .jsonl or .csv
                         list, or the shapes world's stream
    shapes/              the shapes world and its model family (`minidiff train-shapes`)
"""
