"""Pure parts of the benchmark scripts: load config, presets, and the serving-path comparison table."""
import time
import pytest

from benchmarks.loadgen import LoadConfig, parse_levels
from benchmarks.serving_path import build_parser, comparison, format_table, resolve, table_header
from benchmarks.meters import RssMeter, gc_pauses, per_1k_tokens
from benchmarks.stack import _is_proxy


def summary(ttft_p50, itl_p99, rps, failures=None):
    dist = {"p50": ttft_p50, "p90": None, "p99": itl_p99, "max": None, "count": 1}
    failures = failures or {}
    return {"ttft_ms": dist, "itl_ms": dist, "e2e_ms": dist, "rps": rps, "output_tokens_per_s": rps * 64,
            "requests": {"ok": 10, "failed": sum(failures.values()), "failures": failures},
            "loadgen_cpu_util": 0.2}


def test_load_config_paths_and_body():
    cfg = LoadConfig(url="http://127.0.0.1:9000/v1", endpoint="chat", max_tokens=5)
    assert cfg.target() == ("127.0.0.1", 9000, "/v1/chat/completions")
    body = cfg.body()
    assert body["messages"][0]["role"] == "user" and body["max_tokens"] == 5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert LoadConfig(url="http://h").target() == ("h", 80, "/v1/completions")
    assert "messages" not in LoadConfig(include_usage=False).body()


@pytest.mark.parametrize("kwargs", [{"endpoint": "embeddings"}, {"concurrency": 0},
                                    {"duration": None}, {"duration": 5.0, "requests": 10}])
def test_load_config_rejects(kwargs):
    with pytest.raises(ValueError):
        LoadConfig(**kwargs)


def test_load_config_rejects_https():
    with pytest.raises(ValueError):
        LoadConfig(url="https://example.com").target()


def test_parse_levels():
    assert parse_levels("1,16, 64") == [1, 16, 64]
    for bad in ("", "0", "a,b"):
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_presets_fill_only_what_the_command_line_left_out():
    ns = resolve(build_parser().parse_args(["--preset", "scale1000", "--duration", "5"]))
    assert (ns.concurrency, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.ramp, ns.duration) == (1000, 50, 50, 128, 20, 5)
    ns = resolve(build_parser().parse_args([]))
    assert (ns.replicas, ns.concurrency, ns.tokens) == (2, 100, 64)


def test_comparison_rows_show_what_tokenrelay_adds():
    stack = {"summary": summary(25.0, 30.0, 100.0, {"truncated": 2}),
             "cpu": {"proxy": {"cpu_s_per_1k_tokens": 0.05}, "control": {"cpu_s_per_1k_tokens": 0.003},
                     "replicas": {"cpu_s_per_1k_tokens": 0.02}}}
    floor = {"summary": summary(20.0, 12.5, 110.0), "cpu": {"floor": {"cpu_s_per_1k_tokens": 0.01}}}
    rows = {r[0]: r for r in comparison([("1 worker", stack)], floor)}
    assert rows["TTFT p50 ms"][1:] == ("20.00", "25.00", "+5.00")
    assert rows["inter-token p99 ms"][3] == "+17.50"
    assert rows["requests/s"][3] == "-10.0"
    assert rows["failed/measured"][1:3] == ("0/10", "2/12 (truncated=2)")
    assert rows["tokenrelay CPU s / 1k tokens"][2:] == ("0.0530 (all but replicas)", "0.0530")
    assert rows["  proxy"][2] == "0.0500" and rows["  launcher+head+agent"][2] == "0.0030"
    assert rows["server CPU s / 1k tokens"][1:3] == ("0.0100 (floor)", "0.0200 (replicas)")
    assert "replica TokenBatch msgs/s" not in rows  # no replica counters read: no row
    assert "proxy memory per open stream KiB" not in rows
    stack["replicas"] = {"token_batches_per_s": 880.4, "tokens_per_batch": 22.61}
    stack["proxy_memory"] = {"idle_mib": 60.0, "loaded_mib": 160.0, "open_streams": 1000, "kib_per_stream": 102.4}
    stack["gc_pauses"] = {"0": {"collections": 40, "ms": 9.5}, "2": {"collections": 0, "ms": 0.0}}
    rows = {r[0]: r for r in comparison([("1 worker", stack)], floor)}
    assert rows["replica TokenBatch msgs/s"][2] == "880 (22.6 tokens each)"
    assert rows["proxy RSS idle -> loaded MiB"][2] == "60 -> 160"
    assert rows["proxy memory per open stream KiB"][2] == "102.4"
    assert rows["proxy GC (gen:count/pause)"][2] == "g0:40/10ms g2:0/0ms"
    text = format_table(comparison([], floor), table_header([]))
    assert "floor (no proxy)" in text and "TTFT p50 ms" in text


def test_comparison_has_a_column_pair_per_worker_count():
    def run(ttft):
        return {"summary": summary(ttft, 30.0, 100.0),
                "cpu": {"proxy": {"cpu_s_per_1k_tokens": 0.02}, "control": {"cpu_s_per_1k_tokens": 0.001},
                        "replicas": {"cpu_s_per_1k_tokens": 0.01}}}
    floor = {"summary": summary(20.0, 12.5, 110.0), "cpu": {"floor": {"cpu_s_per_1k_tokens": 0.01}}}
    rows = comparison([("1 worker", run(21.0)), ("2 workers", run(23.0))], floor)
    header = table_header(["1 worker", "2 workers"])
    assert header == ("metric", "floor (no proxy)", "1 worker", "added", "2 workers", "added")
    ttft = next(r for r in rows if r[0] == "TTFT p50 ms")
    assert ttft == ("TTFT p50 ms", "20.00", "21.00", "+1.00", "23.00", "+3.00")
    assert all(len(r) == len(header) for r in rows)
    assert "2 workers" in format_table(rows, header)


def test_workers_option_takes_a_list():
    assert build_parser().parse_args(["--workers", "1,2"]).workers == [1, 2]
    assert build_parser().parse_args(["--workers", "2"]).workers == [2]
    for bad in ("0", "a", "1,,2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--workers", bad])


def test_memory_and_gc_readings():
    text = ('tokenrelay_proxy_gc_pause_seconds_count{generation="0"} 12.0\n'
            'tokenrelay_proxy_gc_pause_seconds_sum{generation="0"} 0.003\n'
            'tokenrelay_proxy_gc_pause_seconds_bucket{generation="0",le="0.001"} 12.0\n'
            'tokenrelay_proxy_gc_pause_seconds_count{generation="2"} 1.0\n'
            'tokenrelay_proxy_gc_pause_seconds_sum{generation="2"} 0.02\n')
    assert gc_pauses(text) == {"0": (12.0, 0.003), "2": (1.0, 0.02)}
    meter = RssMeter(lambda: [])
    assert meter.per_stream(10) is None
    meter.idle_bytes, meter.loaded_bytes = 1000, 1000 + 64 * 1024 * 10
    assert meter.per_stream(10) == 64 * 1024


def test_proxy_detection_and_cpu_normalisation():
    assert _is_proxy(["/usr/bin/python", "-m", "proxy", "--bind", "x"])
    assert _is_proxy(["gunicorn: master [tokenrelay-proxy]", ""])
    assert not _is_proxy(["/usr/bin/python", "-m", "agent"])
    assert not _is_proxy([])
    assert per_1k_tokens(0.5, 10000) == 0.05
    assert per_1k_tokens(None, 10) is None and per_1k_tokens(1.0, 0) is None


class _Proc:
    def __init__(self, pid, rss, children=()):
        self.pid, self._rss, self._children = pid, rss, list(children)

    def create_time(self):
        return 1.0

    def memory_info(self):
        return type("mem", (), {"rss": self._rss})()

    def children(self, recursive=False):
        return list(self._children)


def test_memory_counts_each_process_once_when_roots_nest():
    worker = _Proc(2, 300)
    master = _Proc(1, 100, [worker])
    meter = RssMeter(lambda: [master, worker])  # the proxy's roots: the master and its worker
    meter.idle()
    assert meter.idle_bytes == 400


def test_vllm_compare_sets_the_front_ends_event_loops_side_by_side():
    from benchmarks.vllm_compare import compare_level, quietest

    def level(tokens_per_s, others, loop, front):
        s = dict(summary(30.0, 40.0, tokens_per_s / 64), tokens_per_request=64.0,
                 e2e_ms={"p50": 2000.0}, output_tokens_per_s=tokens_per_s)
        return {"concurrency": 16, "summary": s, "cores_busy": {"not_ours": others},
                "cpu_s_per_1k_tokens": {"front_end": front, "front_end_loop": loop}}
    # the round other processes disturbed least is the one compared, its front-end numbers with it
    tr = quietest([{"round": 1, "levels": [level(500.0, 0.30, 0.9, 1.2)]},
                   {"round": 2, "levels": [level(480.0, 0.01, 0.04, 0.05)]}], 16)
    assert (tr["round"], tr["front_end_loop_cpu"], tr["front_end_cpu"]) == (2, 0.04, 0.05)
    vl = quietest([{"round": 1, "levels": [level(500.0, 0.02, 0.08, 0.09)]}], 16)
    c = compare_level(tr, vl, 16, 2)
    assert c["throughput_ratio"] == 0.96 and c["front_end_loop_cpu_ratio"] == 0.5
    vl["front_end_loop_cpu"] = None  # not measured: no ratio, not a crash
    assert compare_level(tr, vl, 16, 2)["front_end_loop_cpu_ratio"] is None


def test_main_thread_cpu_counts_only_the_main_thread():
    import threading

    import psutil

    from benchmarks.meters import CpuMeter, MainThreadCpu

    me = psutil.Process()
    main, whole = MainThreadCpu(lambda: [me]), CpuMeter(lambda: [me], trees=False)
    main.start()
    whole.start()
    def spin() -> None:  # 0.1 s of CPU on another thread only (a fixed loop took 20-60 ms, near /proc's 10 ms ticks)
        start = time.thread_time()
        while time.thread_time() - start < 0.1:
            pass

    other = threading.Thread(target=spin)
    other.start()
    other.join()
    main.stop()
    whole.stop()
    assert main.overlaps and not whole.overlaps
    assert whole.seconds - main.seconds > 0.05  # the other thread's work is in the process, not the main thread
