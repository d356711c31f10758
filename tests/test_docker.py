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


def test_the_runtime_image_installs_no_test_tools():
    import configparser

    steps = parse((REPO / "docker" / "Dockerfile").read_text())
    (install,) = [args for name, args in steps if name == "RUN" and "make install" in args]
    extras = re.search(r"EXTRAS=(\S+)", install).group(1)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    chosen = {line.split("==")[0].split("[")[0].strip() for e in extras.split(",")
              for line in cfg["options.extras_require"][e].splitlines() if line.strip() and not line.startswith("#")}
    assert chosen and not chosen & {"pytest", "moto"}, chosen
    assert 'TORCH_INDEX="$TORCH_INDEX"' in install  # the CPU torch build unless a CUDA image is asked for
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in steps
    entry = [json.loads(args) for name, args in steps if name == "ENTRYPOINT"]
    assert entry == [["/opt/faceage/entrypoint.sh"]]


def _entrypoint(*args, **env):
    import os
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPARK_")}
    clean["PATH"] = bin_dir + os.pathsep + clean["PATH"]
    return subprocess.run(["bash", str(REPO / "docker" / "entrypoint.sh"), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_the_entrypoint_follows_spark_on_kubernetes_conventions():
    import pyspark

    # driver: spark-submit in client mode, bound to the pod address (here: asked for its version)
    proc = _entrypoint("driver", "--version", SPARK_DRIVER_BIND_ADDRESS="127.0.0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"version {pyspark.__version__}" in proc.stdout + proc.stderr
    # executor: refuses clearly when the driver-provided variables are missing
    proc = _entrypoint("executor")
    assert proc.returncode == 2 and "SPARK_DRIVER_URL is not set" in proc.stderr
    # the backend class it starts exists in this Spark
    import pathlib
    import zipfile

    jars = list(pathlib.Path(pyspark.__file__).parent.glob("jars/spark-kubernetes_*.jar"))
    assert jars and any("org/apache/spark/scheduler/cluster/k8s/KubernetesExecutorBackend.class" in zipfile.ZipFile(j).namelist()
               for j in jars)
    assert "KubernetesExecutorBackend" in (REPO / "docker" / "entrypoint.sh").read_text()
    # anything else runs as given
    proc = _entrypoint("python", "-c", "print('as given')")
    assert proc.returncode == 0 and proc.stdout.strip() == "as given"
