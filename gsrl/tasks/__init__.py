"""ManiSkill tasks of gsrl. Importing this package registers them with ManiSkill and gymnasium."""

from gsrl.tasks.put_cube_on_plate import LANGUAGE_INSTRUCTION, PutCubeOnPlateEnv

__all__ = ["LANGUAGE_INSTRUCTION", "PutCubeOnPlateEnv"]
