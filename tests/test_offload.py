"""CPU offloading (minidiff/memory/offload/), tested on the CPU.

Without a GPU the tests offload to device="cpu", the documented rehearsal mode: every onload still
allocates a fresh tensor and copies the weight into it, every offload drops it, so the schedule is
the one a GPU would see. Three things make the tests meaningful on one device:
  - outputs are compared with the unhooked pipeline *exactly* (torch.equal): the copies are
    bitwise and the arithmetic is unchanged, so any difference is a bug;
  - OffloadTracer(check_compute=True) fails any operation that reads a weight's CPU home copy
    instead of a device copy (a missing hook), and the negative controls below show it does fail;
  - the tracer counts what is resident at every moment: at most one component (model offload),
    one weight-owning module (sequential) or two groups (group offload with prefetch).
"""

import warnings

import pytest
import torch
from torch import nn

from minidiff.memory.offload import (OffloadTracer, apply_group_offloading, enable_model_cpu_offload,
                                     enable_sequential_cpu_offload, remove_offload)
from minidiff.models.clip import CLIPTextEmbeddings
from minidiff.pipelines.diffedit import DiffEditPipeline
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.reference import save_tiny_pipeline

# device="cpu" is the rehearsal mode, which warns that it saves no memory (tested once below).
pytestmark = pytest.mark.filterwarnings("ignore:Offloading to device='cpu'")

CALL = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # "sd2": three UNet levels, linear projections, a two-layer CLIP: every block type is present.
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-offload"), flavour="sd2")


@pytest.fixture(scope="module")
def pipe(folder):
    p = StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reference(pipe):
    return pipe(generator=torch.Generator().manual_seed(0), **CALL).images


def placement(pipe):
    """Every parameter of every component: (the Parameter object, its storage, its device)."""
    return {f"{c}.{n}": (p, p.data_ptr(), p.device)
            for c, m in pipe._model_components().items() for n, p in m.named_parameters()}


def assert_same_placement(before, after):
    assert before.keys() == after.keys()
    for key, (p, ptr, dev) in before.items():
        q, qptr, qdev = after[key]
        assert q is p and qptr == ptr and qdev == dev, f"{key} was not restored"


MODES = {
    # name: (install, kind of unit the tracer counts, the most units of that kind allowed at once)
    "model": (lambda p: enable_model_cpu_offload(p, "cpu"), "component", 1),
    "sequential": (lambda p: enable_sequential_cpu_offload(p, "cpu"), "leaf", 1),
    "group": (lambda p: apply_group_offloading(p, "cpu", num_blocks_per_group=1), "group", 1),
    "group-prefetch": (lambda p: apply_group_offloading(p, "cpu", num_blocks_per_group=2, use_stream=True), "group", 2),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_offloaded_pipeline_is_exact_and_bounded(pipe, reference, mode):
    install, kind, most = MODES[mode]
    before = placement(pipe)
    install(pipe)
    try:
        with OffloadTracer(check_compute=True) as tracer:
            images = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    finally:
        remove_offload(pipe)
    assert torch.equal(images, reference)  # bitwise: offloading must not change a single value
    assert tracer.max_resident(kind) == most
    assert tracer.count("onload", kind) + tracer.count("prefetch", kind) > 0
    if mode == "model":
        # One component at a time, in pipeline order; the UNet is moved once for all its steps.
        onloads = [e.name for e in tracer.events if e.action == "onload"]
        assert onloads == ["text_encoder", "unet", "vae"]
        assert tracer.max_resident() == 1
        assert [names for _, names in tracer.timeline()] == [
            ("text_encoder",), (), ("unet",), (), ("vae",)]  # after each onload / offload
    if mode == "sequential":
        assert tracer.max_resident() == 1  # one weight-owning module on the device at any moment
    if mode == "group-prefetch":
        assert tracer.count("prefetch", "group") > 0
    assert_same_placement(before, placement(pipe))
    assert pipe.device == torch.device("cpu")
    assert not any(hasattr(m, "_minidiff_offload") for c in pipe._model_components().values() for m in c.modules())
    # The hooks are gone: a run after removal moves nothing.
    with OffloadTracer() as tracer:
        pipe.decode_latents(torch.zeros(1, 4, 16, 16))
    assert tracer.events == []


def test_every_weight_has_exactly_one_hook(pipe):
    handle = enable_sequential_cpu_offload(pipe, "cpu")
    try:
        in_units = [i for unit in handle.units for i in unit.tensor_ids]  # ids of the offloaded tensors
        all_params = [id(p) for m in pipe._model_components().values() for p in m.parameters()]
        assert sorted(in_units) == sorted(all_params)
        names = {u.name for u in handle.units}
        # CLIP's embeddings read position_embedding.weight directly: offloaded as one unit.
        assert "text_encoder.text_model.embeddings" in names
        assert "unet.down_blocks.0.resnets.0.conv1" in names
    finally:
        remove_offload(pipe)


def test_compute_check_catches_a_missing_hook(pipe, monkeypatch):
    """Negative control: without the whole-unit rule for CLIP's embeddings (their class marker), the
    position table is read by its parent's forward while still on the CPU; the tracer must notice."""
    monkeypatch.setattr(CLIPTextEmbeddings, "reads_child_weights_directly", False)
    enable_sequential_cpu_offload(pipe.text_encoder, "cpu")
    try:
        with pytest.raises(RuntimeError, match="position_embedding"):
            with OffloadTracer(check_compute=True):
                pipe.text_encoder(torch.tensor([[49406, 320, 49407]]))
    finally:
        remove_offload(pipe.text_encoder)


def test_model_offload_covers_vae_encode_and_decode(pipe):
    """vae.encode / vae.decode do not go through forward: the wrappers must still move the VAE in
    and the previous component out."""
    enable_model_cpu_offload(pipe, "cpu")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    try:
        with torch.no_grad(), OffloadTracer(check_compute=True) as tracer:
            pipe.unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 32)).sample
            latent = pipe.vae.encode(image).latent_dist.mean
            pipe.text_encoder(torch.tensor([[49406, 49407]]))
            pipe.vae.decode(latent).sample
        moves = [(e.action, e.name) for e in tracer.events]
        assert moves == [("onload", "unet"), ("offload", "unet"), ("onload", "vae"),
                         ("offload", "vae"), ("onload", "text_encoder"), ("offload", "text_encoder"),
                         ("onload", "vae")]
        # Negative control: without the encode wrapper the VAE computes from its CPU home copy.
        del pipe.vae.__dict__["encode"]
        pipe.text_encoder(torch.tensor([[49406, 49407]]))  # moves the VAE out again
        with pytest.raises(RuntimeError, match="home copy"):
            with torch.no_grad(), OffloadTracer(check_compute=True):
                pipe.vae.encode(image).latent_dist
    finally:
        remove_offload(pipe)
    assert "encode" not in pipe.vae.__dict__ and "decode" not in pipe.vae.__dict__


@pytest.mark.parametrize("mode", ["model", "group-prefetch"])
def test_diffedit_under_offload(folder, mode):
    """DiffEdit enters the VAE through vae.encode (mask and inversion) as well as decode: all three
    steps must give the same result with offloading, with every weight on the device when used."""
    edit = DiffEditPipeline.from_pretrained(folder)
    edit.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # in [0, 1]

    def run():
        g = torch.Generator().manual_seed(1)
        mask = edit.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog",
                                  num_maps_per_mask=2, num_inference_steps=4, generator=g)
        inv = edit.invert(image=image, prompt="a cat", num_inference_steps=4, generator=g)
        out = edit(prompt="a dog", mask_image=mask, image_latents=inv, num_inference_steps=4,
                   generator=g, output_type="pt").images
        return mask, inv.latents, out

    expected = run()
    MODES[mode][0](edit)
    try:
        with OffloadTracer(check_compute=True) as tracer:
            got = run()
    finally:
        remove_offload(edit)
    for a, b in zip(got, expected):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    kind, most = MODES[mode][1:]
    assert tracer.max_resident(kind) == most


def test_group_prefetch_learns_the_order(pipe):
    """After one UNet call the schedule knows the order of the groups: on later calls every group
    arrives by prefetch (none is loaded synchronously) and never more than two are resident."""
    unet = pipe.unet
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = unet(x, 10, context).sample
        handle = apply_group_offloading(unet, "cpu", num_blocks_per_group=1, use_stream=True)
        try:
            unet(x, 10, context).sample  # learns the successors
            unet(x, 10, context).sample  # learns the wrap-around (last up block -> first group)
            with OffloadTracer(check_compute=True) as tracer:
                out = unet(x, 10, context).sample
            groups = [u.name for u in handle.units if u.kind == "group"]
            assert groups == ["time_embedding", "down_blocks[0]", "down_blocks[1]", "down_blocks[2]", "mid_block",
                              "up_blocks[0]", "up_blocks[1]", "up_blocks[2]"]
            assert tracer.count("onload", "group") == 0
            assert tracer.count("prefetch", "group") == len(groups)
            assert tracer.max_resident("group") == 2
        finally:
            remove_offload(unet)
    assert torch.equal(out, expected)


def test_group_prefetch_survives_a_wrong_guess(pipe):
    """The VAE learns encode -> decode -> encode, so the end of every decode prefetches the
    encoder's first group. Then decode runs again instead: that prefetch was a wrong guess. The
    stale group must be sent home (still at most two groups resident), the schedule must learn
    the new order, and the result must not change."""
    vae = pipe.vae
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
        expected = vae.decode(latent).sample
        apply_group_offloading(vae, "cpu", num_blocks_per_group=1, use_stream=True)
        try:
            for _ in range(2):
                vae.encode(image).latent_dist
                vae.decode(latent).sample
            # The last decode of the loop prefetched the encoder's first group: a wrong guess now.
            with OffloadTracer(check_compute=True) as tracer:
                assert tracer.resident("group") == ["encoder.down_blocks[0]"]
                vae.decode(latent).sample
                out = vae.decode(latent).sample
        finally:
            remove_offload(vae)
    assert torch.equal(out, expected)
    assert tracer.max_resident("group") == 2
    stale = [e.action for e in tracer.events if e.name.startswith("encoder")]
    assert stale == ["offload"]  # sent home when the decoder started, and not prefetched again
    assert tracer.count("prefetch", "group") > 0


def test_group_offload_without_prefetch_has_one_group_resident(pipe):
    with torch.no_grad():
        x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
        expected = pipe.unet(x, 10, context).sample
        apply_group_offloading(pipe.unet, "cpu", num_blocks_per_group=3)
        try:
            with OffloadTracer(check_compute=True) as tracer:
                out = pipe.unet(x, 10, context).sample
        finally:
            remove_offload(pipe.unet)
    assert torch.equal(out, expected)
    assert tracer.max_resident("group") == 1 and tracer.count("prefetch") == 0
    assert {e.name for e in tracer.events if e.kind == "group"} == {
        "time_embedding", "down_blocks[0-2]", "mid_block", "up_blocks[0-2]"}


def test_offload_twice_is_refused_and_removal_is_idempotent(pipe):
    before = placement(pipe)
    enable_model_cpu_offload(pipe, "cpu")
    with pytest.raises(ValueError, match="already has model offload hooks"):
        enable_model_cpu_offload(pipe, "cpu")
    with pytest.raises(ValueError, match="remove_offload"):
        apply_group_offloading(pipe.unet, "cpu")  # another mode on a component
    remove_offload(pipe)
    remove_offload(pipe)  # nothing left: a no-op
    assert_same_placement(before, placement(pipe))
    enable_sequential_cpu_offload(pipe.unet, "cpu")  # allowed again after removal
    remove_offload(pipe)  # finds the hooks on the component
    assert_same_placement(before, placement(pipe))


def test_tied_weights_are_refused_and_nothing_is_left_half_installed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied: one Parameter in two modules
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters(remove_duplicate=False)}
    with pytest.raises(ValueError, match="tied weights"):
        enable_sequential_cpu_offload(model, "cpu")
    after = {n: (p, p.data_ptr()) for n, p in model.named_parameters(remove_duplicate=False)}
    assert after == before
    assert not model._forward_pre_hooks and not model[0]._forward_pre_hooks and not model[1]._forward_hooks
    enable_model_cpu_offload(model, "cpu")  # the whole model as one unit is fine
    remove_offload(model)


def test_weights_leave_the_device_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise ZeroDivisionError("boom")

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), Boom()))
    enable_sequential_cpu_offload(model, "cpu")
    with OffloadTracer() as tracer:
        with pytest.raises(ZeroDivisionError):
            model(torch.randn(2, 4))
    remove_offload(model)
    assert tracer.resident() == [] and tracer.count("onload") == 2 and tracer.count("offload") == 2


def test_cpu_device_is_a_documented_rehearsal_and_bad_devices_are_refused():
    model = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="saves no memory"):
        enable_sequential_cpu_offload(model, "cpu")
    remove_offload(model)
    with pytest.raises(ValueError, match="meta"):
        enable_model_cpu_offload(model, "meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            enable_model_cpu_offload(model, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="num_blocks_per_group"):
            apply_group_offloading(model, "cpu", num_blocks_per_group=0)
        with pytest.raises(ValueError, match="no blocks"):
            apply_group_offloading(model, "cpu")
    with pytest.raises(ValueError, match="pipeline"):
        enable_model_cpu_offload(object(), "cpu")
    assert not hasattr(model, "_minidiff_offload")


def test_tracer_reports_nothing_before_it_is_entered():
    """A tracer that was never entered has seen nothing, even while weights are on the device."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    handle = enable_model_cpu_offload(model, "cpu")
    try:
        model(torch.randn(1, 4))  # leaves the model on the device (model offload keeps the last one)
        tracer = OffloadTracer()
        assert tracer.resident() == [] and tracer.events == [] and tracer.timeline() == []
        assert tracer.max_resident() == 0 and tracer.peak_bytes() == 0 and tracer.count("onload") == 0
        with tracer:
            assert tracer.resident() == ["Sequential"]  # entered: it sees what is on the device
    finally:
        remove_offload(handle)


def test_pipeline_reads_the_execution_device_the_hooks_set(pipe):
    """The one piece of state between hooks and pipeline: `pipe.execution_device`, set on install
    (the loop's `pipe.device` reads it) and reset on removal."""
    assert pipe.execution_device is None
    enable_model_cpu_offload(pipe, "cpu")
    try:
        assert pipe.execution_device == torch.device("cpu") and pipe.device == pipe.execution_device
    finally:
        remove_offload(pipe)
    assert pipe.execution_device is None
