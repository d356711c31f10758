"""docker/Dockerfile, checked statically (no Docker engine runs here): parsed instruction by instruction."""
import json
import re
import shlex

from conftest import REPO

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
         "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse(text: str):
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    assert not current, "the file ends inside a continued line"
    return out


def test_dockerfile_is_well_formed_and_follows_the_rules():
    steps = parse((REPO / "docker" / "Dockerfile").read_text())
    names = [name for name, _ in steps]
    assert set(names) <= KNOWN, set(names) - KNOWN
    assert names[0] == "FROM"
    image = steps[0][1].split()[0]
    assert ":" in image and not image.endswith(":latest")  # a pinned base tag
    for name, args in steps:
        if name == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args
            assert "openjdk-17" in args  # Spark needs Java 17
        if name == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for src in words[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} is not in the repository"
        if name in ("CMD", "ENTRYPOINT"):
            assert isinstance(json.loads(args), list)  # exec form: signals reach the process
        if name == "WORKDIR":
            assert args.startswith("/")
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1] not in ("root", "0")  # runs as a normal user
    installs = [args for name, args in steps if name == "RUN" and "make install" in args]
    assert installs and re.search(r"^install:", (REPO / "Makefile").read_text(), re.M)
    assert names.index("USER") < names.index("RUN", names.index("USER"))  # installs as that user


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "demo_out", "dist"} <= ignored
