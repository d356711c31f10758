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
            assert "/tmp/image.txt" in args  # the Debian packages of docker/image.txt, the list make image reads
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
    installs = [args for name, args in steps if name == "RUN" and "docker/install.sh" in args]
    assert installs and (REPO / "docker" / "install.sh").exists()  # the install step docker/rootfs.sh runs too
    assert names.index("USER") < names.index("RUN", names.index("USER"))  # installs as that user


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "demo_out", "dist"} <= ignored


def _image_list(key: str) -> str:
    (line,) = [l for l in (REPO / "docker" / "image.txt").read_text().splitlines() if l.startswith(f"{key}:")]
    return line.split(":", 1)[1].strip()


def test_the_dockerfile_and_make_image_share_one_list():
    steps = parse((REPO / "docker" / "Dockerfile").read_text())
    assert "openjdk-17-jre-headless" in _image_list("debian").split()  # Spark needs Java 17
    env = [args for name, args in steps if name == "ENV"]
    assert env == [_image_list("env")]  # the Dockerfile's environment is the list's, word for word
    assert steps[0][1].startswith("debian:bookworm")  # make image's base (mmdebstrap bookworm) too
    assert "bookworm" in (REPO / "docker" / "rootfs.sh").read_text()
    copied = " ".join(args for name, args in steps if name == "COPY")
    for package in ("faceage", "photos", "schemas", "shell", "spark_jobs", "trainer"):  # setup.cfg's packages
        assert f"{package}/ src/{package}/" in copied


def test_the_runtime_image_installs_no_test_tools_and_no_torch():
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), str(REPO)],
                             capture_output=True, text=True, check=True).stdout.split()
    names = {re.split(r"[\[=]", r)[0] for r in printed}
    assert {"pyspark", "onnxruntime", "fastapi", "uvicorn"} <= names
    assert not names & {"torch", "torchvision", "pytest", "moto", "nbclient", "ipykernel", "mlflow-skinny"}, names
    steps = parse((REPO / "docker" / "Dockerfile").read_text())
    assert ("ARG", "TORCH_INDEX=") in steps  # a training image only when a CPU torch index is given
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
