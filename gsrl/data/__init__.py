"""Datasets: demonstrations on disk in LeRobot's layout, and the torch views SFT trains on."""
