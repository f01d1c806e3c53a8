"""gsrl: online RL fine-tuning of VLA policies in ManiSkill scenes rendered with 3D Gaussian Splatting.

Importing the package turns gRPC's fork support off (unless the environment already sets it). With it on, grpcio
1.81+ restarts its epoll poller in every child that ``subprocess.Popen`` forks from a process that has used gRPC;
the poller then hits the descriptors Popen closes before ``exec`` (EBADF) and can kill the child first
(grpc/grpc#43055). That is how ffmpeg, spawned to write episode videos, died now and then in env servers, ``gsrl
eval`` and the test process (BrokenPipe, with "epoll_wait error: Bad file descriptor" in its stderr). gsrl forks
only to exec another program and never uses gRPC in a forked child, so the fork handlers have nothing to do. It is
set here because every role imports ``gsrl`` before it imports ``grpc``, and gRPC reads it at initialisation.

It also keeps large buffers in malloc's heap (``gsrl.large_buffers``): without that, every copy of a tensor of
32 MiB or more into ``bytes`` paid for a fresh mapping in page faults, and the codec ran at a tenth of its speed.
"""

import os

from gsrl.large_buffers import keep_large_buffers_in_heap

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
keep_large_buffers_in_heap()
