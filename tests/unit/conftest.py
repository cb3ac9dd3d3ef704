import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture
def accelerator():
    """A single-process Accelerator as the recipes make it, torn down so the next test starts clean."""
    acc = Accelerator(step_scheduler_with_optimizer=False)
    yield acc
    AcceleratorState._reset_state()
    GradientState._reset_state()
