"""GPU placement presets: which GPUs each env server, policy server and learner rank of a local run sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsrl import launcher
from gsrl.config import ConfigError, load_config
from gsrl.placement import (
    ENV_SERVER,
    LEARNER,
    NO_VULKAN_DRIVER,
    POLICY_SERVER,
    ROLES,
    GpuPlan,
    assign_gpus,
    gpu_roles,
    plan_for,
    renders_with_sapien,
    visible_gpu_names,
    without_vulkan_drivers,
)


def plan(preset: str, gpus: int, env: int, policy: int, learner: int, **kwargs: object) -> GpuPlan:
    return assign_gpus(preset, gpus, env_servers=env, policy_servers=policy, learner_ranks=learner, **kwargs)


def own(p: GpuPlan, role: str) -> list[int | None]:
    return [p.own_gpu(role, i) for i in range(len(p.processes[role]))]


def gpus_of(p: GpuPlan, role: str) -> set[int]:
    return {g for devices in p.processes[role] for g in devices}


def test_separate_splits_the_gpus_into_disjoint_contiguous_blocks() -> None:
    p = plan("separate", 8, env=4, policy=1, learner=2)
    assert own(p, ENV_SERVER) == [0, 1, 2, 3]
    assert own(p, POLICY_SERVER) == [4]
    assert p.processes[LEARNER] == ((5, 6), (5, 6)), "ranks see their role's GPUs and pick one by LOCAL_RANK"
    assert own(p, LEARNER) == [5, 6]
    env, policy, learner = (gpus_of(p, r) for r in ROLES)
    assert not (env & policy) and not (env & learner) and not (policy & learner)
    assert all(len(devices) == 1 for devices in p.processes[ENV_SERVER]), "one GPU per env server"
    assert [p.cuda_visible_devices(ENV_SERVER, i) for i in range(4)] == ["0", "1", "2", "3"]
    assert p.cuda_visible_devices(LEARNER, 1) == "5,6"


def test_separate_deals_extra_processes_round_robin_over_their_block() -> None:
    p = plan("separate", 4, env=5, policy=1, learner=1)
    assert own(p, ENV_SERVER) == [0, 1, 0, 1, 0]
    assert own(p, POLICY_SERVER) == [2] and own(p, LEARNER) == [3]


def test_shared_gives_every_process_every_gpu_with_its_own_first() -> None:
    p = plan("shared", 4, env=3, policy=1, learner=2)
    for role in ROLES:
        for devices in p.processes[role]:
            assert sorted(devices) == [0, 1, 2, 3], role
    assert own(p, LEARNER) == [0, 1]
    # Policy server, then env servers, from the last GPU down: first onto the GPUs the learner ranks leave free.
    assert own(p, POLICY_SERVER) == [3]
    assert own(p, ENV_SERVER) == [2, 1, 0]
    assert p.cuda_visible_devices(POLICY_SERVER, 0) == "3,0,1,2"
    assert p.cuda_visible_devices(LEARNER, 0) == p.cuda_visible_devices(LEARNER, 1) == "0,1,2,3"
    assert not p.policy_on_broadcast_root_gpu()


def test_shared_on_one_gpu_puts_everything_on_it_and_flags_the_nccl_broadcast() -> None:
    p = plan("shared", 1, env=2, policy=1, learner=1)
    assert all(devices == (0,) for role in ROLES for devices in p.processes[role])
    assert p.policy_on_broadcast_root_gpu(), "NCCL cannot broadcast between two members on one GPU"


def test_hybrid_gives_learners_their_own_gpus_and_env_and_policy_the_rest() -> None:
    p = plan("hybrid", 8, env=4, policy=2, learner=2)
    assert gpus_of(p, LEARNER) == {6, 7} and own(p, LEARNER) == [6, 7]
    rest = set(range(6))
    assert gpus_of(p, ENV_SERVER) == gpus_of(p, POLICY_SERVER) == rest
    # Env and policy servers continue one round-robin over their shared GPUs, policy servers first.
    assert own(p, POLICY_SERVER) == [5, 4]
    assert own(p, ENV_SERVER) == [3, 2, 1, 0]


def test_hybrid_with_more_servers_than_gpus_wraps_round_robin() -> None:
    p = plan("hybrid", 3, env=5, policy=1, learner=1)
    assert own(p, LEARNER) == [2]
    assert own(p, POLICY_SERVER) == [1]
    assert own(p, ENV_SERVER) == [0, 1, 0, 1, 0]


def test_zero_gpus_places_nothing() -> None:
    for preset in ("separate", "shared", "hybrid"):
        p = plan(preset, 0, env=3, policy=1, learner=4, learner_gpus=(5,))
        assert p.num_gpus == 0
        assert all(devices == () for role in ROLES for devices in p.processes[role])


def test_roles_on_the_cpu_see_no_gpu_and_need_none() -> None:
    # One GPU is enough for separate when only the learner computes on it (state tasks, a CPU policy server).
    p = plan("separate", 1, env=2, policy=1, learner=1, gpu_roles={LEARNER})
    assert own(p, LEARNER) == [0]
    assert p.processes[ENV_SERVER] == ((), ()) and p.processes[POLICY_SERVER] == ((),)
    assert p.cuda_visible_devices(POLICY_SERVER, 0) == "", "an empty CUDA_VISIBLE_DEVICES hides every GPU"


def test_explicit_lists_replace_what_the_preset_derives() -> None:
    p = plan("separate", 8, env=2, policy=1, learner=2, learner_gpus=(0, 1))
    assert own(p, LEARNER) == [0, 1]
    assert not (gpus_of(p, ENV_SERVER) | gpus_of(p, POLICY_SERVER)) & {0, 1}, "derived roles skip listed GPUs"
    p = plan("hybrid", 4, env=2, policy=1, learner=1, env_gpus=(0,), policy_gpus=(0, 1))
    assert own(p, ENV_SERVER) == [0, 0] and own(p, POLICY_SERVER) == [1]
    assert own(p, LEARNER) == [3]


@pytest.mark.parametrize(
    ("preset", "gpus", "counts", "kwargs", "key", "fragment"),
    [
        ("separate", 2, (2, 1, 1), {}, "placement.preset", "need 3, but 2 are shown"),
        ("separate", 1, (2, 1, 1), {}, "placement.preset", "placement.preset=shared"),
        ("hybrid", 1, (2, 1, 1), {}, "placement.preset", "the learners take all 1 GPU"),
        ("hybrid", 2, (2, 1, 4), {}, "placement.preset", "4 learner rank(s) need 4 GPU(s)"),
        ("shared", 2, (2, 1, 4), {}, "placement.preset", "NCCL will not put two ranks on one GPU"),
        ("separate", 4, (2, 1, 2), {"learner_gpus": (3,)}, "placement.learner_gpus", "gives them 1"),
        ("shared", 2, (1, 1, 1), {"env_gpus": (2,)}, "placement.env_gpus", "GPU(s) [2] do not exist"),
        ("separate", 4, (1, 1, 1), {"env_gpus": (0,), "policy_gpus": (0,)}, "placement.policy_gpus", "shares"),
        ("triple", 4, (1, 1, 1), {}, "placement.preset", "must be one of"),
    ],
)
def test_unsatisfiable_placements_are_refused_naming_the_key(
    preset: str, gpus: int, counts: tuple[int, int, int], kwargs: dict, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        plan(preset, gpus, *counts, **kwargs)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_children_name_gpus_as_the_launcher_sees_them() -> None:
    assert visible_gpu_names(None, 3) == ["0", "1", "2"]
    assert visible_gpu_names("4,6", 2) == ["4", "6"]
    assert visible_gpu_names("GPU-aaa,GPU-bbb, GPU-ccc", 2) == ["GPU-aaa", "GPU-bbb"]
    assert visible_gpu_names("", 0) == []
    p = plan("separate", 2, env=1, policy=0, learner=1)
    assert p.cuda_visible_devices(ENV_SERVER, 0, ["4", "6"]) == "4"
    assert p.cuda_visible_devices(LEARNER, 0, ["4", "6"]) == "6"


def test_placement_config_validation_names_the_key() -> None:
    assert load_config().placement.preset == "separate"
    cases = [
        ("placement.preset=colocated", "placement.preset", "must be one of"),
        ("placement.gpus=-1", "placement.gpus", ">= 0"),
        ("placement.env_gpus=[0, 0]", "placement.env_gpus", "twice"),
        ("placement.learner_gpus=[-1]", "placement.learner_gpus", ">= 0"),
    ]
    for override, key, fragment in cases:
        with pytest.raises(ConfigError, match=fragment) as err:
            load_config(None, [override])
        assert err.value.key == key
    with pytest.raises(ConfigError, match=r"placement.gpus \(2\)") as err:
        load_config(None, ["placement.gpus=2", "placement.policy_gpus=[2]"])
    assert err.value.key == "placement.policy_gpus"
    overlap = ["placement.env_gpus=[0, 1]", "placement.learner_gpus=[1]"]
    for preset, refused in (("separate", True), ("hybrid", True), ("shared", False)):
        if refused:
            with pytest.raises(ConfigError, match=r"shares GPU\(s\) \[1\]") as err:
                load_config(None, [f"placement.preset={preset}", *overlap])
            assert err.value.key == "placement.learner_gpus"
        else:
            load_config(None, [f"placement.preset={preset}", *overlap])
    # hybrid co-locates env and policy servers, so their lists may overlap
    load_config(None, ["placement.preset=hybrid", "placement.env_gpus=[0]", "placement.policy_gpus=[0]"])


def test_gpu_roles_follow_the_devices_in_the_config() -> None:
    assert gpu_roles(load_config()) == {LEARNER}, "state task, CPU policy server, learner on auto"
    config = load_config(None, ["policy_server.device=cuda", "learner.device=cpu"])
    assert gpu_roles(config) == {POLICY_SERVER}
    gs = load_config(None, ["task.id=GSEnv-PutCubeOnPlate-v0", "task.obs_mode=rgb"])
    assert ENV_SERVER in gpu_roles(gs)
    assert ENV_SERVER not in gpu_roles(gs.with_overrides(["task.render.device=cpu"]))


def test_plan_for_a_config_counts_env_servers_and_learner_ranks() -> None:
    config = load_config(
        None,
        ["placement.preset=hybrid", "env_server.num_servers=3", "learner.world_size=2", "redis.max_stream_len=128"],
    )
    p = plan_for(config, 4)
    assert len(p.processes[ENV_SERVER]) == 3 and len(p.processes[POLICY_SERVER]) == 1
    assert own(p, LEARNER) == [2, 3]
    assert p.processes[ENV_SERVER] == ((), (), ()), "state env servers compute on the CPU"


def test_launcher_sets_cuda_visible_devices_per_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = load_config(None, ["placement.preset=shared", "policy_server.device=cuda"])
    p, names = launcher.gpu_plan(config, {"CUDA_VISIBLE_DEVICES": "5,7"})
    assert names == ["5", "7"]
    base = {"PATH": "/bin"}
    assert launcher.with_gpus(base, p, names, LEARNER, 0)["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert launcher.with_gpus(base, p, names, POLICY_SERVER, 0)["CUDA_VISIBLE_DEVICES"] == "7,5"
    assert launcher.with_gpus(base, p, names, ENV_SERVER, 0)["CUDA_VISIBLE_DEVICES"] == "", "state env: no GPU"
    assert base == {"PATH": "/bin"}, "the shared environment is not modified"

    with pytest.raises(ConfigError, match="this machine shows 2") as err:
        launcher.gpu_plan(config.with_overrides(["placement.gpus=3"]), {})
    assert err.value.key == "placement.gpus"
    p, names = launcher.gpu_plan(config.with_overrides(["placement.gpus=1"]), {})
    assert names == ["0"] and p.num_gpus == 1 and p.policy_on_broadcast_root_gpu()

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    p, names = launcher.gpu_plan(config, {})
    assert launcher.with_gpus(base, p, names, LEARNER, 0) is base, "no GPUs: the environment is left alone"


def test_hiding_vulkan_points_every_driver_list_at_nothing() -> None:
    base = {"PATH": "/bin", "VK_DRIVER_FILES": "/usr/local/nvidia/icd.json", "VK_ADD_DRIVER_FILES": "/x.json"}
    hidden = without_vulkan_drivers(base)
    assert hidden == {"PATH": "/bin", "VK_DRIVER_FILES": NO_VULKAN_DRIVER, "VK_ICD_FILENAMES": NO_VULKAN_DRIVER}
    assert base["VK_DRIVER_FILES"] == "/usr/local/nvidia/icd.json", "the given environment is not modified"


def test_only_splat_env_servers_render_with_sapien() -> None:
    state = load_config()
    assert not any(renders_with_sapien(state, role) for role in ROLES)
    gs = load_config(None, ["task.id=GSEnv-PutCubeOnPlate-v0", "task.obs_mode=rgb", "task.render.device=cpu"])
    assert renders_with_sapien(gs, ENV_SERVER) and not renders_with_sapien(gs, POLICY_SERVER)


def test_cpu_placed_children_of_a_gpu_host_get_no_vulkan_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-loop bench on one H100: separate, learner on GPU 0, env and policy servers on the CPU. Env servers
    that reached the NVIDIA Vulkan driver with CUDA hidden died with signal 11 before logging anything."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = load_config(None, ["env_server.num_servers=2"])
    p, names = launcher.gpu_plan(config, {})
    base = {"PATH": "/bin", "VK_DRIVER_FILES": "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json"}
    learner = launcher.with_gpus(base, p, names, LEARNER, 0)
    assert learner == {**base, "CUDA_VISIBLE_DEVICES": "0"}, "a process on a GPU keeps its Vulkan driver"
    for role, index in ((ENV_SERVER, 0), (ENV_SERVER, 1), (POLICY_SERVER, 0)):
        child = launcher.with_gpus(base, p, names, role, index)
        assert child["CUDA_VISIBLE_DEVICES"] == ""
        assert child["VK_DRIVER_FILES"] == child["VK_ICD_FILENAMES"] == NO_VULKAN_DRIVER
    rendering = launcher.with_gpus(base, p, names, ENV_SERVER, 0, renders=True)
    assert rendering == {**base, "CUDA_VISIBLE_DEVICES": ""}, "a CPU env server that renders keeps Vulkan"

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    p, names = launcher.gpu_plan(config, {})
    assert launcher.with_gpus(base, p, names, ENV_SERVER, 0) is base, "no GPU host: Mesa's CPU Vulkan stays"


def test_children_start_with_faulthandler_on(tmp_path: Path) -> None:
    env = launcher.child_environment({"PATH": "/bin"}, "redis://127.0.0.1:1/0", tmp_path)
    assert env["PYTHONFAULTHANDLER"] == "1", "a native crash prints the Python stack into the role's log"
    assert env["GSRL_REDIS_URL"] == "redis://127.0.0.1:1/0" and env["GSRL_RUN_DIR"] == str(tmp_path)
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"


def test_exit_codes_name_the_signal() -> None:
    assert launcher.describe_exit(1) == "code 1"
    assert launcher.describe_exit(-11).startswith("code -11 (SIGSEGV")


def test_env_servers_split_evenly_over_the_policy_servers() -> None:
    ports = [5001, 5002, 5003]
    addresses = [launcher.policy_address_for(ports, i) for i in range(7)]
    assert addresses[:3] == ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]
    assert [addresses.count(f"127.0.0.1:{p}") for p in ports] == [3, 2, 2]
    config = load_config(None, ["policy_server.num_servers=3", "policy_server.port=6000"])
    got = launcher.policy_ports(config)
    assert got[0] == 6000 and len(set(got)) == 3, got


def test_plan_for_a_run_places_each_of_its_policy_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    config = load_config(
        None,
        [
            "policy_server.device=cuda",
            "policy_server.num_servers=2",
            "learner.world_size=4",
            "redis.max_stream_len=1024",
            "placement.preset=shared",
            "placement.learner_gpus=[0, 1, 2, 3]",
            "placement.policy_gpus=[1, 3]",
        ],
    )
    p, names = launcher.gpu_plan(config, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert sorted(own(p, POLICY_SERVER)) == [1, 3], "one policy server on each GPU of placement.policy_gpus"
    visible = [launcher.with_gpus({}, p, names, POLICY_SERVER, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)]
    assert [v.split(",")[0] for v in visible] == [str(g) for g in own(p, POLICY_SERVER)], visible


@pytest.mark.parametrize(("preset", "gpus"), [("gs_vla_ppo_2gpu", 2), ("gs_vla_ppo_4gpu", 4)])
def test_whole_host_vla_presets_place_every_process(monkeypatch: pytest.MonkeyPatch, preset: str, gpus: int) -> None:
    """The campaign's RL_GPUS presets on their hosts (GPU count faked: no GPU here): a learner rank per GPU, env
    servers spread evenly over all of them, and no policy server on rank 0's GPU, where NCCL (the preset's weight
    broadcast) would refuse a second member of its group."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = load_config(Path(__file__).parents[2] / "configs" / f"{preset}.yaml")
    p, _names = launcher.gpu_plan(config, {})
    assert own(p, LEARNER) == list(range(gpus))
    assert len(p.processes[POLICY_SERVER]) == config.policy_server.num_servers
    assert not p.policy_on_broadcast_root_gpu() and config.learner.broadcast_backend == "nccl"
    env_gpus = own(p, ENV_SERVER)
    assert len(env_gpus) == config.env_server.num_servers
    assert {g: env_gpus.count(g) for g in set(env_gpus)} == dict.fromkeys(range(gpus), len(env_gpus) // gpus)
    samples = config.learner.world_size * config.learner.segments_per_update * config.policy_server.segment_length
    assert samples == 1024, "each preset's update is the one-GPU preset's 1,024 chunk samples"
