"""Which GPUs each process of a local run sees: the placement presets as pure functions.

``gsrl train`` starts env servers, policy servers and learner ranks on one machine; this module decides, from the
preset (``placement.preset``), the number of GPUs and the number of processes per role, the GPU indices each process
sees, and turns them into ``CUDA_VISIBLE_DEVICES`` values. The Helm chart makes the same choices per pod
(deploy/helm/gsrl, ``placement.preset``); docs/placement.md explains the trade-offs.

- ``separate``: every role draws from GPUs of its own (contiguous blocks: env servers, then policy servers, then
  learners, as RLinf's "env 0-1, rollout 2-5, actor 6-7"); each env or policy server sees one GPU, dealt round-robin
  over its role's block.
- ``shared``: every process sees every GPU. Learner ranks use GPU ``r`` (``LOCAL_RANK``); policy servers, then env
  servers, are dealt round-robin from the last GPU down, so they start on the GPUs the learners leave free, and each
  sees the GPUs rotated to put its own first (its ``cuda`` / ``cuda:0``).
- ``hybrid``: the learner ranks get the last ``world_size`` GPUs; env and policy servers share the rest, dealt as in
  ``shared``.

A process placed on the CPU of a GPU host sees no GPU through CUDA and, unless it renders with SAPIEN (a
splat-rendered env server), no Vulkan driver either (``without_vulkan_drivers``): SAPIEN probes Vulkan even for
CPU physics (``sapien.Device("cpu")``, which ManiSkill calls for every env, enumerates the Vulkan devices), and a
state env server that reached the NVIDIA Vulkan driver with its CUDA devices hidden died with signal 11 on an H100
host. With no driver at all, SAPIEN's device probe finds none and CPU physics runs.

Learner ranks always see their role's GPUs in order and pick theirs with ``LOCAL_RANK`` (what torchrun and the
learner's ``torch.cuda.set_device(LOCAL_RANK)`` expect), so they need one GPU each: NCCL refuses two ranks on one
device. Env and policy servers are independent processes and may share a GPU when there are more of them than GPUs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gsrl.config import PLACEMENT_DISJOINT, PLACEMENT_PRESETS, Config, ConfigError

ENV_SERVER = "env_server"
POLICY_SERVER = "policy_server"
LEARNER = "learner"
ROLES = (ENV_SERVER, POLICY_SERVER, LEARNER)
# The config key of each role's explicit GPU list (placement.*) and of its process count, for error messages.
GPU_LIST_KEYS = {
    ENV_SERVER: "placement.env_gpus",
    POLICY_SERVER: "placement.policy_gpus",
    LEARNER: "placement.learner_gpus",
}
COUNT_KEYS = {
    ENV_SERVER: "env_server.num_servers",
    POLICY_SERVER: "policy_server.num_servers",
    LEARNER: "learner.world_size",
}

_ROLE_OF_KEY = {key.removeprefix("placement."): role for role, key in GPU_LIST_KEYS.items()}

Devices = tuple[int, ...]


@dataclass(frozen=True)
class GpuPlan:
    """The GPU indices every process sees, per role and instance (``()``: none, a CPU process).

    Indices count the GPUs this machine shows (0 .. ``num_gpus`` - 1); ``cuda_visible_devices`` names them.
    The first index of a process is its own GPU (``cuda:0`` inside it); learner rank ``r`` uses index ``r``.
    """

    preset: str
    num_gpus: int
    processes: Mapping[str, tuple[Devices, ...]] = field(default_factory=dict)

    def devices(self, role: str, index: int) -> Devices:
        return self.processes[role][index]

    def own_gpu(self, role: str, index: int) -> int | None:
        """The GPU the process computes on (learner rank r: its r-th; others: their first), or None on the CPU."""
        devices = self.devices(role, index)
        if not devices:
            return None
        return devices[index] if role == LEARNER else devices[0]

    def cuda_visible_devices(self, role: str, index: int, names: Sequence[str] | None = None) -> str:
        """``CUDA_VISIBLE_DEVICES`` for one process: its GPUs as this machine names them.

        ``names[i]`` is how GPU index ``i`` is named to a child: the entries of the launcher's own
        ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) when it has one, else ``"0", "1", ...``. An empty string hides
        every GPU, which is what a process that runs on the CPU should see.
        """
        names = list(names) if names is not None else [str(i) for i in range(self.num_gpus)]
        return ",".join(names[i] for i in self.devices(role, index))

    def policy_on_broadcast_root_gpu(self) -> bool:
        """Whether a policy server computes on learner rank 0's GPU: NCCL cannot broadcast between them (use gloo)."""
        root = self.own_gpu(LEARNER, 0) if self.processes.get(LEARNER) else None
        return root is not None and any(
            self.own_gpu(POLICY_SERVER, i) == root for i in range(len(self.processes.get(POLICY_SERVER, ())))
        )

    def describe(self) -> str:
        """One line for the launcher's log: ``env-server-0: 2 | policy-server-0: 3 | learner-0: 0,1``."""
        parts = []
        for role in ROLES:
            for i, devices in enumerate(self.processes.get(role, ())):
                shown = ",".join(map(str, devices)) if devices else "cpu"
                parts.append(f"{role.replace('_', '-')}-{i}: {shown}")
        return " | ".join(parts)


def assign_gpus(
    preset: str,
    num_gpus: int,
    *,
    env_servers: int,
    policy_servers: int,
    learner_ranks: int,
    gpu_roles: Collection[str] = ROLES,
    env_gpus: Sequence[int] = (),
    policy_gpus: Sequence[int] = (),
    learner_gpus: Sequence[int] = (),
) -> GpuPlan:
    """Assign GPU indices to every process of a run; raises ConfigError naming the key when it cannot be done.

    ``gpu_roles`` are the roles that compute on a GPU (the others get none and see none); ``*_gpus`` are explicit
    GPU lists that replace what the preset would derive for that role. With ``num_gpus == 0`` every process gets
    ``()`` and the caller leaves the environment alone.
    """
    if preset not in PLACEMENT_PRESETS:
        raise ConfigError("placement.preset", f"must be one of {PLACEMENT_PRESETS}, got {preset!r}")
    counts = {ENV_SERVER: env_servers, POLICY_SERVER: policy_servers, LEARNER: learner_ranks}
    for role, count in counts.items():
        if count < 0:
            raise ConfigError(COUNT_KEYS[role], f"must be >= 0, got {count}")
    unknown = set(gpu_roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {ROLES}")
    if num_gpus < 0:
        raise ConfigError("placement.gpus", f"must be >= 0, got {num_gpus}")
    if num_gpus == 0:
        return GpuPlan(preset, 0, {role: ((),) * count for role, count in counts.items()})

    explicit = {ENV_SERVER: tuple(env_gpus), POLICY_SERVER: tuple(policy_gpus), LEARNER: tuple(learner_gpus)}
    for role, ids in explicit.items():
        missing = [i for i in ids if not 0 <= i < num_gpus]
        if missing:
            raise ConfigError(
                GPU_LIST_KEYS[role], f"GPU(s) {missing} do not exist: {num_gpus} GPU(s) shown, indices 0-{num_gpus - 1}"
            )
    for first, second in PLACEMENT_DISJOINT[preset]:
        common = sorted(set(explicit[_ROLE_OF_KEY[first]]) & set(explicit[_ROLE_OF_KEY[second]]))
        if common:
            raise ConfigError(
                f"placement.{second}", f"shares GPU(s) {common} with placement.{first} under preset {preset!r}"
            )
    needing = [role for role in ROLES if role in gpu_roles and counts[role] > 0]
    pools = _pools(preset, num_gpus, counts, needing, explicit)
    learner_pool = pools.get(LEARNER, ())

    processes: dict[str, tuple[Devices, ...]] = {role: ((),) * count for role, count in counts.items()}
    if LEARNER in needing:
        processes[LEARNER] = (learner_pool,) * learner_ranks  # rank r uses learner_pool[r] via LOCAL_RANK
    dealt: dict[Devices, int] = {}  # co-located processes on one pool continue one round-robin
    for role in (POLICY_SERVER, ENV_SERVER):
        if role not in needing:
            continue
        pool = pools[role]
        assigned = []
        for _ in range(counts[role]):
            if preset == "separate":
                slot = len(assigned) % len(pool)
                assigned.append((pool[slot],))
            else:
                turn = dealt.get(pool, 0)
                dealt[pool] = turn + 1
                slot = len(pool) - 1 - turn % len(pool)  # from the last GPU down, away from the learner ranks
                assigned.append(pool[slot:] + pool[:slot])  # every GPU of the pool, its own first
        processes[role] = tuple(assigned)
    return GpuPlan(preset, num_gpus, processes)


def _pools(
    preset: str, num_gpus: int, counts: dict[str, int], needing: list[str], explicit: dict[str, Devices]
) -> dict[str, Devices]:
    """The GPUs each role that needs one may use, before they are dealt to its processes."""
    pools = {role: explicit[role] for role in needing if explicit[role]}
    derived = [role for role in needing if role not in pools]
    taken = {i for role in ROLES for i in explicit[role]}
    free = tuple(i for i in range(num_gpus) if i not in taken)
    every = tuple(range(num_gpus))

    if preset == "shared":
        pools.update({role: every for role in derived})
    elif preset == "hybrid":
        if LEARNER in derived:
            pools[LEARNER] = free[-counts[LEARNER] :]  # the last GPUs: env and policy servers keep the first ones
        if LEARNER in needing:
            _check_learner_pool(preset, num_gpus, pools[LEARNER], counts[LEARNER], bool(explicit[LEARNER]))
        learner_ids = set(pools.get(LEARNER, ()))
        rest = tuple(i for i in every if i not in learner_ids)
        for role in (r for r in derived if r != LEARNER):
            if not rest:
                raise ConfigError(
                    "placement.preset",
                    f"hybrid gives the learner ranks GPUs of their own and env and policy servers the rest, but the "
                    f"learners take all {num_gpus} GPU(s) shown; add a GPU, lower learner.world_size, or use shared",
                )
            pools[role] = rest
    else:  # separate
        if len(free) < len(derived):
            shown = (
                f"{num_gpus} are shown" if len(free) == num_gpus else f"{len(free)} of the {num_gpus} shown are free"
            )
            raise ConfigError(
                "placement.preset",
                f"separate gives each role GPUs of its own: {', '.join(derived)} need {len(derived)}, but {shown}; "
                "set placement.preset=shared (or hybrid), add GPUs, or run a role on the CPU",
            )
        sizes = _split(len(free), {role: counts[role] for role in derived})
        start = 0
        for role in (ENV_SERVER, POLICY_SERVER, LEARNER):  # contiguous blocks, env servers first
            if role in sizes:
                pools[role] = free[start : start + sizes[role]]
                start += sizes[role]
    if LEARNER in needing:
        _check_learner_pool(preset, num_gpus, pools[LEARNER], counts[LEARNER], bool(explicit[LEARNER]))
    return pools


def _check_learner_pool(preset: str, num_gpus: int, pool: Devices, ranks: int, explicit: bool) -> None:
    """Learner ranks pick their GPU by LOCAL_RANK and NCCL refuses two ranks on one GPU: one GPU per rank."""
    if len(pool) < ranks:
        raise ConfigError(
            GPU_LIST_KEYS[LEARNER] if explicit else "placement.preset",
            f"{ranks} learner rank(s) need {ranks} GPU(s), one each (NCCL will not put two ranks on one GPU), but "
            f"preset {preset!r} gives them {len(pool)} of the {num_gpus} shown; lower learner.world_size, add GPUs, "
            "or run the learner on the CPU (learner.device=cpu)",
        )


def _split(num_gpus: int, demand: dict[str, int]) -> dict[str, int]:
    """How many of ``num_gpus`` each role gets under separate: one each, then one at a time to the role with the
    most processes per GPU, never more GPUs than processes (a process uses one). Ties favour the learner, whose
    ranks cannot share a GPU, then the policy servers. GPUs nobody can use stay idle."""
    sizes = dict.fromkeys(demand, 1)
    order = [role for role in (LEARNER, POLICY_SERVER, ENV_SERVER) if role in demand]
    for _ in range(num_gpus - len(demand)):
        hungry = [role for role in order if sizes[role] < demand[role]]
        if not hungry:
            break
        role = max(hungry, key=lambda r: demand[r] / sizes[r])  # max() keeps the first of equals: the order above
        sizes[role] += 1
    return sizes


def gpu_roles(config: Config) -> frozenset[str]:
    """The roles that compute on a GPU under ``config``: learners and policy servers unless their device is cpu,
    env servers only for splat-rendered tasks whose renderer is not on the CPU (physics runs on the CPU)."""
    roles = set()
    if config.learner.device != "cpu":
        roles.add(LEARNER)
    if config.policy_server.device != "cpu":
        roles.add(POLICY_SERVER)
    if config.task.is_splat_rendered and config.task.render.device != "cpu":
        roles.add(ENV_SERVER)
    return frozenset(roles)


def plan_for(config: Config, num_gpus: int, *, policy_servers: int = 1) -> GpuPlan:
    """The placement of a local run of ``config`` over ``num_gpus`` GPUs (``gsrl train`` passes its policy servers)."""
    placement = config.placement
    return assign_gpus(
        placement.preset,
        num_gpus,
        env_servers=config.env_server.num_servers,
        policy_servers=policy_servers,
        learner_ranks=config.learner.world_size,
        gpu_roles=gpu_roles(config),
        env_gpus=placement.env_gpus,
        policy_gpus=placement.policy_gpus,
        learner_gpus=placement.learner_gpus,
    )


# A driver manifest path that cannot exist (a file below /dev/null): the Vulkan loader then loads no driver at all.
NO_VULKAN_DRIVER = "/dev/null/gsrl-no-vulkan-driver.json"
# VK_DRIVER_FILES is the loader's current name, VK_ICD_FILENAMES the older one (older loaders, and SAPIEN's own
# check at import, which points it at a bundled NVIDIA manifest when unset); VK_ADD_DRIVER_FILES would add drivers.
VULKAN_DRIVER_VARIABLES = ("VK_DRIVER_FILES", "VK_ICD_FILENAMES")


def without_vulkan_drivers(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process that must load no Vulkan driver: the loader's driver lists point at nothing."""
    hidden = {k: v for k, v in env.items() if k != "VK_ADD_DRIVER_FILES"}
    hidden.update(dict.fromkeys(VULKAN_DRIVER_VARIABLES, NO_VULKAN_DRIVER))
    return hidden


def renders_with_sapien(config: Config, role: str) -> bool:
    """Whether processes of ``role`` need a SAPIEN render device under ``config``: only env servers of splat-rendered
    tasks (the splat observer reads the scene's lights from SAPIEN's render system); state tasks build none."""
    return role == ENV_SERVER and config.task.is_splat_rendered


def visible_gpu_names(cuda_visible_devices: str | None, count: int) -> list[str]:
    """How the ``count`` GPUs a process sees are named to its children.

    Without ``CUDA_VISIBLE_DEVICES`` they are ``"0" .. str(count - 1)``; with it, its first ``count`` entries (indices
    or ``GPU-``/``MIG-`` UUIDs), so a child's list is a subset of the parent's, never GPUs the parent was not given.
    ``count`` comes from CUDA (``torch.cuda.device_count()``), which already stops at an invalid entry.
    """
    if cuda_visible_devices is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    return entries[:count]
