"""The runtime image's Python requirements, from ONE list (docker/image.txt) and the pins (setup.cfg):

    python3 docker/requirements.py SOURCE_TREE [--training]

prints setup.cfg's install_requires less image.txt's leave-out names (--training: all of them), torch and
torchvision excepted (a training image takes those from a CPU wheel index: docker/install.sh)."""
import configparser
import re
import sys


def requirements(src: str, training: bool = False):
    leave = set()
    with open(f"{src}/docker/image.txt") as f:
        for line in f:
            if line.startswith("leave-out:"):
                leave.update(line.split(":", 1)[1].split())
    cfg = configparser.ConfigParser()
    cfg.read(f"{src}/setup.cfg")
    for line in cfg["options"]["install_requires"].splitlines():
        req = line.split("#")[0].strip()
        name = re.split(r"[\[=<>!~ ]", req)[0].lower() if req else ""
        if req and (training or name not in leave) and name not in ("torch", "torchvision"):
            yield req


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], "--training" in sys.argv[2:])))
