import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    # DeepSpeed JIT-compiles a CPU op (shared-memory all-reduce) when it initialises torch.distributed.
    # torch guards each build with a lock file in this directory; a build killed mid-way leaves that
    # file behind, and every later build in the same directory waits on it forever. A directory of
    # this run's own (inherited by the processes the tests launch) cannot hold another run's lock.
    import atexit
    import shutil
    import tempfile

    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="multitap-torch-ext-")
    atexit.register(shutil.rmtree, os.environ["TORCH_EXTENSIONS_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """A test that hangs fails with every thread's stack after pytest-timeout's limit (pyproject:
    20 minutes; slow tests, which launch multi-process runs with their own timeouts, get 40)."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(2400))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(base_dir, reward_dir) of the seeded tiny Qwen2-VL MULTI-TAP model."""
    from multitap_rl.testing import build_tiny_multitap

    return build_tiny_multitap(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dirs):
    from multitap_rl import MultiTapModel

    base, reward = tiny_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")


@pytest.fixture(scope="session")
def tiny_mllama_dirs(tmp_path_factory):
    """(base_dir, reward_dir) of the seeded tiny Llama-3.2-Vision (Mllama) MULTI-TAP model."""
    from multitap_rl.testing import build_tiny_mllama_multitap

    return build_tiny_mllama_multitap(tmp_path_factory.mktemp("tiny_mllama"), seed=0)


@pytest.fixture(scope="session")
def tiny_mllama_model(tiny_mllama_dirs):
    from multitap_rl import MultiTapModel

    base, reward = tiny_mllama_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")


@pytest.fixture(scope="session")
def tiny_xc2_dirs(tmp_path_factory):
    """(base_dir, reward_dir) of the seeded tiny InternLM-XComposer2.5 MULTI-TAP model."""
    from multitap_rl.testing import build_tiny_internlm_xc2_multitap

    return build_tiny_internlm_xc2_multitap(tmp_path_factory.mktemp("tiny_xc2"), seed=0)


@pytest.fixture(scope="session")
def tiny_xc2_model(tiny_xc2_dirs):
    from multitap_rl import MultiTapModel

    base, reward = tiny_xc2_dirs
    return MultiTapModel.from_pretrained(reward, base_model=base, device="cpu")


# Tests that must hold for every backbone take these: one run per backbone family.
BACKBONE_FIXTURES = {"qwen2_vl": ("tiny_dirs", "tiny_model"), "mllama": ("tiny_mllama_dirs", "tiny_mllama_model"),
                     "internlm_xc2": ("tiny_xc2_dirs", "tiny_xc2_model")}


@pytest.fixture(scope="session", params=sorted(BACKBONE_FIXTURES))
def backbone_family(request):
    return request.param


@pytest.fixture(scope="session")
def backbone_dirs(backbone_family, request):
    """(base_dir, reward_dir) of the tiny model of ``backbone_family``."""
    return request.getfixturevalue(BACKBONE_FIXTURES[backbone_family][0])


@pytest.fixture(scope="session")
def backbone_model(backbone_family, request):
    """The ``MultiTapModel`` (default engine) of the tiny model of ``backbone_family``."""
    return request.getfixturevalue(BACKBONE_FIXTURES[backbone_family][1])


@pytest.fixture(scope="session")
def images():
    from multitap_rl.testing import make_image

    return [make_image(i, size=(64 + 8 * i, 48 + 4 * i)) for i in range(4)]
