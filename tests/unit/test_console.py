"""The console stays quiet (known noise filtered unless verbose, truncation notes once) and log lines
print above the training bar through tqdm.write instead of being glued to it."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from dydit_scale import console
from dydit_scale.train.metrics import MetricsLog

_TRUNCATED = "The following part of your input was truncated because `max_sequence_length` is set to 16 tokens: "


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("diffusers.pipelines", logging.WARNING, __file__, 1, message, None, None)


@pytest.fixture
def clean_logging():
    """Undo what the console functions change in the process-wide logging and warnings state."""
    loggers = console._console_loggers() + [logging.getLogger("DeepSpeed")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    filters = {handler: list(handler.filters) for logger in loggers for handler in logger.handlers}
    with warnings.catch_warnings():
        yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
    for handler, kept in filters.items():
        handler.filters[:] = kept


@pytest.mark.parametrize("message", [
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
    "Attention backends are an experimental feature and the API may be subject to change.",
])
def test_filter_drops_known_noise(message: str) -> None:
    assert not console.NoiseFilter().filter(_record(message))


def test_filter_passes_other_warnings() -> None:
    noise = console.NoiseFilter()
    assert noise.filter(_record("Some weights of the model checkpoint were not used"))
    assert noise.filter(_record("checkpoint step-0000010 committed"))


def test_truncation_note_once_per_encoder() -> None:
    noise = console.NoiseFilter()
    assert noise.filter(_record(_TRUNCATED + "['a long caption']"))
    assert not noise.filter(_record(_TRUNCATED + "['another caption']"))
    clip = "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
    assert noise.filter(_record(clip + "['x']"))
    assert not noise.filter(_record(clip + "['y']"))


def test_notes_shown_once_are_not_repeated_by_other_ranks() -> None:
    assert console.NoiseFilter(main=True).filter(_record(_TRUNCATED + "['x']"))
    other = console.NoiseFilter(main=False)
    assert not other.filter(_record(_TRUNCATED + "['x']"))
    assert other.filter(_record("a warning nobody listed"))


def test_library_noise_quiet_unless_verbose(clean_logging, capsys) -> None:
    logging.getLogger("diffusers").handlers[:] = [logging.StreamHandler(sys.stderr)]  # capsys's stream
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    console.quiet_third_party(verbose=True)
    diffusers_log.warning("Attention backends are an experimental feature and the API may be subject to change.")
    assert "Attention backends" in capsys.readouterr().err
    console.quiet_third_party(verbose=False)
    diffusers_log.warning("Attention backends are an experimental feature and the API may be subject to change.")
    diffusers_log.warning(_TRUNCATED + "['one']")
    diffusers_log.warning(_TRUNCATED + "['two']")
    diffusers_log.warning("a warning nobody listed")
    err = capsys.readouterr().err
    assert "Attention backends" not in err and "a warning nobody listed" in err
    assert err.count("was truncated") == 1 and "['one']" in err
    assert logging.getLogger("DeepSpeed").level == logging.WARNING
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("Failed to load image Python extension: libjpeg", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_noise_stays_filtered_while_a_bar_redirects_logging(clean_logging, capsys, monkeypatch) -> None:
    monkeypatch.setattr(console, "_active_filter", None)
    logging.getLogger("diffusers").handlers[:] = [logging.StreamHandler(sys.stderr)]  # capsys's stream
    console.quiet_third_party(verbose=False)
    with console.bar_safe_logging():  # tqdm's handlers replace the console ones
        logging.getLogger("diffusers.models").warning("Attention backends are an experimental feature and more")
        logging.getLogger("diffusers.models").warning("a warning nobody listed")
    err = capsys.readouterr().err
    assert "Attention backends" not in err and "a warning nobody listed" in err


def test_log_lines_print_above_the_bar(clean_logging, tmp_path, capsys, monkeypatch) -> None:
    handler = logging.StreamHandler(sys.stderr)  # sys.stderr is capsys's now
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    metrics = MetricsLog(tmp_path, enabled=True, tensorboard=False, total_steps=3, start_step=0, every_steps=1)
    try:
        metrics.step(1, {"loss": 0.5, "flops_ratio": 0.9})
        warnings.warn("a warning during training", UserWarning)
        metrics.step(2, {"loss": 0.4, "flops_ratio": 0.8})
    finally:
        metrics.close()
    err = capsys.readouterr().err
    assert "train:" in err  # the bar drew on the same stream
    for line in ("LOG step 1 ", "LOG step 2 ", "LOG "):
        at = err.index(line)
        assert err[at - 1] in "\r\n", f"{line!r} is glued to {err[max(0, at - 40):at]!r}"
    warning_at = err.index("a warning during training")
    assert err.rfind("LOG", 0, warning_at) > err.index("LOG step 1")  # it went through logging too
    assert root.handlers == [handler]  # the redirect ended with the bar
