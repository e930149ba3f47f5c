"""EnergyParams.amplitude_images through a real server on loopback: a client's photographs set the
phase parameterization's amplitude; jobs with different photographs share a batch and each gives
its solo image; bad images and other parameterizations are refused naming the field. Also the
client keyword and the CLI flag (--amplitude-image)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.cli.main import main as cli_main
from service.client import PreimageClient, error_details
from service.jobs.limits import JobLimits, SchedulerLimits
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import SIZE, conv_net

FAST = {"steps": 8, "report_every": 0}
FIELD = "params.amplitude_images"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"),
        seed_bundled=False,
        torch_threads=1,
        # Results independent of who shares a batch: what the batch test compares exactly.
        batch_invariant=True,
        # Pixels enough for scikit-image's coffee (400×600), the photo the CLI test names.
        job_limits=JobLimits(max_input_pixels=512 * 512, max_steps=100_000),
        # Room for 8 images of 32×32 across batches: a job of 8 views fills it, and jobs that come
        # while it runs wait, to be admitted together (into one batch) once it has gone.
        scheduler=SchedulerLimits(max_total_pixels=8 * SIZE * SIZE),
    )
    running = start_server("127.0.0.1:0", config)
    with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
        client.upload(conv_net(seed=3), name="tiny")
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server: object) -> Iterator[PreimageClient]:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=120) as c:  # type: ignore[attr-defined]
        yield c


def blobs(seed: int, side: int = 64) -> np.ndarray:
    """Smooth colour blobs: an amplitude that falls steeply with frequency."""
    coarse = np.random.default_rng(seed).random((4, 4, 3)) * 255
    return np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC))


def stripes(side: int = 64) -> np.ndarray:
    """Fine vertical stripes: an amplitude concentrated at one high horizontal frequency."""
    row = ((np.arange(side) // 2) % 2 * 200 + 20).astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], side, axis=0), 3, axis=2)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def maximize(client: PreimageClient, **kwargs: object) -> bytes:
    """The PNG of a natural-preset maximization of channel 0 at relu2 (phase parameterization)."""
    (result,) = client.maximize("tiny", "relu2", [0], channel_max=1.0, **FAST, **kwargs).wait().results
    assert result.resolved.params.parameterization == pb.PARAMETERIZATION_PHASE
    return result.png


def refusal(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    details = error_details(caught.value)
    return details.code, details.message, details.fields


def test_amplitude_images_change_the_image(client: PreimageClient) -> None:
    default = maximize(client)
    own = maximize(client, amplitude_images=[blobs(1), blobs(2)])
    assert own != default
    assert maximize(client, amplitude_images=[blobs(1), blobs(2)]) == own  # deterministic, not noise
    assert maximize(client, amplitude_images=[stripes()]) not in (own, default)
    # Caricature takes them too (its natural preset is fourier: phase asked for explicitly).
    (result,) = client.caricature("tiny", "relu2", [blobs(5, side=SIZE)], parameterization="phase",
                                  amplitude_images=[stripes()], **FAST).wait().results  # fmt: skip
    (plain,) = client.caricature("tiny", "relu2", [blobs(5, side=SIZE)], parameterization="phase",
                                 **FAST).wait().results  # fmt: skip
    assert result.png != plain.png


def test_jobs_with_different_amplitude_images_share_a_batch_and_each_gives_its_solo_image(
    server: object, client: PreimageClient
) -> None:
    scheduler = server.servicer.scheduler  # type: ignore[attr-defined]
    smooth, striped = {"amplitude_images": [blobs(1)]}, {"amplitude_images": [stripes()]}
    solo = [maximize(client, **smooth), maximize(client, **striped)]
    assert solo[0] != solo[1]  # same seed: the amplitude alone tells them apart

    # A long job of 8 views (the default amplitude, another tap) fills the server's pixels...
    blocker = client.maximize("tiny", "relu1", [0], channel_max=1.0, steps=50_000, copies=8, report_every=1)
    next(iter(blocker))  # ...and is running: its first progress event has come
    pair = [client.maximize("tiny", "relu2", [0], channel_max=1.0, **FAST, **extra) for extra in (smooth, striped)]
    deadline = time.monotonic() + 60
    while scheduler.queued() < 2:  # both wait for room, admitted together once the blocker leaves
        assert time.monotonic() < deadline, "the two jobs never queued"
        time.sleep(0.01)
    blocker.cancel()
    batched = [run.wait().results[0].png for run in pair]
    # A step ran both rows in one minimizer (every other job here runs one row per step).
    assert 2 in scheduler.batch_sizes
    assert batched == solo


@pytest.mark.parametrize(
    ("images", "code", "field", "hint"),
    [
        ([png(blobs(1)), b"GIF89a not really"], grpc.StatusCode.INVALID_ARGUMENT, f"{FIELD}[1]", "not an image"),
        ([b""], grpc.StatusCode.INVALID_ARGUMENT, f"{FIELD}[0]", "is empty"),
        ([png(blobs(1, side=600))], grpc.StatusCode.RESOURCE_EXHAUSTED, f"{FIELD}[0]", "at most 262144 pixels"),
        ([png(blobs(1))] * 17, grpc.StatusCode.INVALID_ARGUMENT, FIELD, "at most 16"),
    ],
    ids=["undecodable", "empty", "too many pixels", "too many images"],
)
def test_bad_amplitude_images_are_refused_naming_the_field(
    client: PreimageClient, images: list[bytes], code: grpc.StatusCode, field: str, hint: str
) -> None:
    got, message, fields = refusal(lambda: maximize(client, amplitude_images=images))
    assert got == code and hint in message, message
    assert list(fields) == [field]


# The presets' defaults: paper maximize and invert are pixel, natural caricature is fourier.
@pytest.mark.parametrize(
    ("task", "params"),
    [("maximize", {"preset": "paper"}), ("maximize", {"parameterization": "fourier"}), ("invert", {}),
     ("caricature", {})],
)  # fmt: skip
def test_amplitude_images_need_the_phase_parameterization(
    client: PreimageClient, task: str, params: dict[str, str]
) -> None:
    def call() -> None:
        common = {"amplitude_images": [blobs(1)], **FAST, **params}
        if task == "maximize":
            client.maximize("tiny", "relu2", [0], channel_max=1.0, **common).wait()
        else:
            getattr(client, task)("tiny", "relu2", [blobs(5, side=SIZE)], **common).wait()

    code, message, fields = refusal(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "parameterization is" in message, message
    assert list(fields) == [FIELD]


def test_the_cli_flag_sends_the_images(
    server: object, client: PreimageClient, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = tmp_path / "stripes.png"
    image.write_bytes(png(stripes()))
    address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    argv = ["maximize", "--model", "tiny", "--tap", "relu2", "--channel", "0", "--channel-max", "1", "--steps", "8",
            "--report-every", "0", "--server", address, "-o", str(tmp_path / "m.png")]  # fmt: skip
    out = tmp_path / "m.png"
    # A file and a scikit-image photo by name, as --image takes them.
    assert cli_main([*argv, "--amplitude-image", str(image), "--amplitude-image", "coffee"]) == 0, capsys.readouterr()
    from service.jobs.reference import photo

    assert out.read_bytes() == maximize(client, amplitude_images=[image, photo("coffee")])
    # A file that is no image: the server's INVALID_ARGUMENT, one line, exit status 2.
    capsys.readouterr()
    text = tmp_path / "notes.txt"
    text.write_text("not a photograph")
    assert cli_main([*argv, "--amplitude-image", str(image), "--amplitude-image", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "INVALID_ARGUMENT" in err and f"{FIELD}[1]" in err, err
