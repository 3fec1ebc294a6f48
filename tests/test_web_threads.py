"""The web app's torch thread count: timed on the app's own work at the server's start (web_threads.py)."""
import pytest
import torch

from pipeline import Pipeline
from tests.webserver import tiny_model
from web_threads import choose_sampling_threads, fastest_thread_count, thread_counts, timed_on_new_thread


@pytest.fixture(autouse=True)
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, counts", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_thread_counts_double_up_to_the_cores(cores, counts):
    assert thread_counts(cores) == counts


class FakeWork:
    """A call whose duration, on a fake clock, depends on the torch thread count its own thread sees."""

    def __init__(self, cost: dict[int, float], first_call_extra: float = 0.0):
        self.now, self.cost, self.extra, self.seen = 0.0, cost, first_call_extra, []

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        n = torch.get_num_threads()
        self.now += self.cost[n] + (self.extra if n not in self.seen else 0.0)
        self.seen.append(n)


def test_the_fastest_count_wins_on_the_worker_threads_own_count_and_warm_up_is_not_counted():
    work = FakeWork({1: 0.5, 2: 0.8, 4: 0.6}, first_call_extra=10.0)  # a slow first call per count: warm-up
    best, medians = fastest_thread_count(work, [1, 2, 4], rounds=3, clock=work.clock)
    assert best == 1 and medians == pytest.approx({1: 0.5, 2: 0.8, 4: 0.6})
    assert work.seen == [1, 2, 4] * 4  # alternating counts, each as the worker thread saw it
    assert torch.get_num_threads() == 1  # left at the choice


def test_ties_go_to_fewer_threads_and_a_later_faster_count_wins():
    work = FakeWork({1: 0.5, 2: 0.5})
    assert fastest_thread_count(work, [1, 2], rounds=1, clock=work.clock)[0] == 1
    work = FakeWork({1: 0.9, 2: 0.4})
    assert fastest_thread_count(work, [1, 2], rounds=2, clock=work.clock)[0] == 2
    assert torch.get_num_threads() == 2


def test_an_error_on_the_worker_thread_reaches_the_caller():
    def broken():
        raise ValueError("no model")

    with pytest.raises(ValueError, match="no model"):
        timed_on_new_thread(broken)


class NoProbe:
    """A pipeline stand-in whose generate must not run."""
    model = torch.nn.Linear(1, 1)

    def generate(self, *args, **kwargs):
        raise AssertionError("probed although OMP_NUM_THREADS was set")


def test_omp_num_threads_is_obeyed_without_probing():
    torch.set_num_threads(1)
    lines = []
    assert choose_sampling_threads(NoProbe(), {"OMP_NUM_THREADS": "1"}, lines.append) == 1
    assert lines == ["torch threads: 1 (OMP_NUM_THREADS)"]


def test_a_real_pipeline_is_probed_with_the_apps_batch_and_left_at_the_choice(tmp_path, monkeypatch):
    pipe = Pipeline.load(tiny_model(tmp_path / "tiny.safetensors"), "cpu")
    batches, generate = [], pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda prompts, **kw: (batches.append((len(prompts), kw)), generate(prompts, **kw)))
    torch.set_num_threads(2)
    lines = []
    chosen = choose_sampling_threads(pipe, {}, lines.append)
    assert chosen in (1, 2) and torch.get_num_threads() == chosen
    assert batches == [(4, {"steps": 4})] * 8  # (1 warm-up + 3 timed) x 2 counts, 4 images as the app's default
    assert lines[0].startswith(f"torch threads: {chosen}, the fastest for 4 images of 4 steps (1: ")
