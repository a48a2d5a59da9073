import time

import pytest

from megatron_sharpness.testing.launch import LaunchError, run_ranks


def test_a_failed_rank_ends_the_launch_instead_of_leaving_the_others_blocked():
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit('rank 1 gave up')\ntime.sleep(120)"
    started = time.monotonic()
    with pytest.raises(LaunchError) as error:
        run_ranks(["-c", code], world_size=2, timeout=100)
    assert time.monotonic() - started < 60
    assert "a rank failed" in str(error.value) and "rank 1 gave up" in str(error.value)


def test_a_hung_launch_times_out():
    with pytest.raises(LaunchError, match="timed out after 2s"):
        run_ranks(["-c", "import time; time.sleep(120)"], world_size=2, timeout=2)


def test_ranks_get_torchrun_environment():
    results = run_ranks(["-c", "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], "
                               "os.environ['OMP_NUM_THREADS'])"], world_size=3, timeout=60)
    assert [r.output.split() for r in results] == [["0", "3", "1"], ["1", "3", "1"], ["2", "3", "1"]]


def test_ranks_build_torch_extensions_in_a_folder_of_this_environment():
    import hashlib
    import os
    import sys

    prefix = os.path.realpath(sys.prefix)
    expected = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                            f"{os.path.basename(prefix)}-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}")
    if os.environ.get("XDG_CACHE_HOME") or os.environ["TORCH_EXTENSIONS_DIR"] != expected:
        pytest.skip("TORCH_EXTENSIONS_DIR or XDG_CACHE_HOME was set outside the tests")
    code = "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    results = run_ranks(["-c", code], world_size=2, timeout=60)
    assert [r.output.strip() for r in results] == [expected, expected]
