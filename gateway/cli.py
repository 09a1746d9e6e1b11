"""``gateway serve | sim | keys create | config check | bench``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import faulthandler
import os
import signal
import sys
from pathlib import Path

from gateway.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gateway", description="Multi-tenant, OpenAI-compatible LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; GATEWAY_HOST)")
    serve.add_argument("--port", type=_port, help="port to listen on (default 4000; GATEWAY_PORT)")
    serve.add_argument("--config-dir", type=Path, help="folder of models.yaml and tenants.yaml (GATEWAY_CONFIG_DIR)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1; GATEWAY_WORKERS)")
    serve.set_defaults(run=_serve)

    sim = commands.add_parser("sim", help="run the vLLM-compatible simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8000)
    sim.add_argument("--model", action="append", default=[], help="model name served (repeat; default: any)")
    sim.add_argument("--api-key", help="require this key, as vLLM's --api-key does")
    sim.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    sim.add_argument("--itl-ms", type=float, default=0.0, help="time between tokens")
    sim.add_argument("--max-num-seqs", type=int, default=256, help="requests generated at once")
    sim.add_argument("--max-loras", type=int, default=4, help="LoRA adapter slots")
    sim.add_argument("--lora-swap-ms", type=float, default=0.0, help="time to bring an adapter into a slot")
    sim.add_argument("--nodes", type=int, default=1, help="simulated vLLM nodes, on consecutive ports from --port")
    sim.add_argument("--error-rate", type=float, default=0.0, help="share of requests that fail")
    sim.add_argument("--error-status", type=int, default=500, help="status of the injected failures")
    sim.add_argument("--hang-rate", type=float, default=0.0, help="share of requests never answered")
    sim.add_argument("--break-stream-after", type=int, help="cut streams after this many tokens")
    sim.add_argument("--slow-stream-ms", type=float, default=0.0, help="extra time between streamed tokens")
    sim.add_argument("--base-config", help="the base model's config.json: adapters are checked against it on load")
    sim.set_defaults(run=_sim)

    stores = commands.add_parser("stores", help="where the running gateway's embedded Valkey and PostgreSQL are")
    stores.add_argument("--data-dir", type=Path, help="the gateway's data folder (GATEWAY_DATA_DIR, default data)")
    stores.set_defaults(run=_stores)

    keys = commands.add_parser("keys", help="manage tenant API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key, store its hash in tenants.yaml, print it once")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="the tenant the key belongs to")
    owner.add_argument("--admin", action="store_true", help="make a key for the admin API instead")
    create.add_argument("--name", default=None, help="a label for the key (default: key-YYYYMMDD-HHMMSS)")
    create.add_argument("--expires", type=dt.date.fromisoformat,
                        help="YYYY-MM-DD: the key stops working at the start of this day (UTC)")
    create.add_argument("--config-dir", type=Path)
    create.set_defaults(run=_keys_create)

    config = commands.add_parser("config", help="work with the config files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate models.yaml and tenants.yaml")
    check.add_argument("--config-dir", type=Path)
    check.set_defaults(run=_config_check)

    router = commands.add_parser("router", help="train and judge the complexity classifier")
    router_commands = router.add_subparsers(dest="router_command", required=True)
    for name, description in (("train", "fit a scorer and choose its blend leave-group-out"),
                              ("evaluate", "APGR on the held-out half and leave-group-out, and the curves"),
                              ("calibrate", "the threshold that sends a given share to the large model")):
        command = router_commands.add_parser(name, help=description)
        command.add_argument("--data", type=Path, help="JSON lines: prompt, weak_correct, strong_correct "
                                                       "(default: the MMLU routing data shipped with the package)")
        command.add_argument("--scorer", type=Path, help="the scorer file (default: the one shipped; train: the "
                                                         "file to write, required)")
        command.set_defaults(run=_router)
    train = router_commands.choices["train"]
    train.add_argument("--all", action="store_true", help="train on every example, not only the training half")
    train.add_argument("--from-ledger", action="store_true",
                       help="learn from the gateway's own traffic (DATABASE_URL): cascade judgements and feedback; "
                            "with --data, from both")
    train.add_argument("--tenant", help="with --from-ledger: only this tenant's requests")
    train.add_argument("--days", type=int, default=90, help="with --from-ledger: the last this many days")
    evaluate = router_commands.choices["evaluate"]
    evaluate.add_argument("--svg", type=Path, help="draw the curves into this file")
    evaluate.add_argument("--every-row", action="store_true",
                          help="judge on every row, not the held-out half: for data the scorer was not trained on")
    evaluate.add_argument("--learning-curve", action="store_true",
                          help="also: each group's APGR as its own labelled examples join the training (minutes)")
    calibrate = router_commands.choices["calibrate"]
    calibrate.add_argument("--large-share", type=float, required=True,
                           help="share of requests to send to a large model: COMPLEX and CRITICAL (0 to 1)")
    calibrate.add_argument("--critical-share", type=float, help="share of requests to classify CRITICAL (0 to 1)")
    calibrate.add_argument("--from-ledger", action="store_true",
                           help="use the scores of requests the gateway routed (DATABASE_URL) instead of --data")
    calibrate.add_argument("--tenant", help="with --from-ledger: only this tenant's requests")
    calibrate.add_argument("--days", type=int, default=30, help="with --from-ledger: the last this many days")

    bench = commands.add_parser("bench", help="measure the gateway against a direct run to the simulator")
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    bench.add_argument("--rounds", type=int, default=3, help="measurements per target, interleaved; medians reported")
    bench.add_argument("--latency-ms", type=float, default=5.0, help="the simulator's fixed time to answer")
    bench.add_argument("--output", type=_output, help="also write the results as JSON here")
    bench.add_argument("--baseline", type=_checkout, help="a checkout of another version of the gateway: its core and "
                                                     "whole gateway are measured in the same run, interleaved")
    bench.set_defaults(run=_bench)
    bench_kinds = bench.add_subparsers(
        dest="bench_kind",
        metavar="[summary | tenants | fleet | providers | protocols | guardrails | shares | large-prompts | workers | "
                "fine-tuning | console | ledger | redis | retrieval | semantic]")

    def bench_kind(name: str, help: str, run) -> argparse.ArgumentParser:
        kind = bench_kinds.add_parser(name, help=help)
        kind.add_argument("--output", type=_output, help="also write the results as JSON here")
        kind.set_defaults(run=run)
        return kind

    summary_bench = bench_kind("summary", "the performance targets side by side from one run, as ratios",
                               _bench_summary)
    summary_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    summary_bench.add_argument("--rounds", type=int, default=3, help="measurements per target, interleaved")
    tenants_bench = bench_kind("tenants", "admin writes, reloads, idle CPU, memory and the request path with many "
                                          "tenants", _bench_tenants)
    tenants_bench.add_argument("--tenants", type=int, default=10_000, help="half in tenants.yaml, half made "
                                                                         "through the admin API")
    tenants_bench.add_argument("--duration", type=float, default=5.0, help="seconds per request-path measurement")
    fleet_bench = bench_kind("fleet", "adapter placement on a simulated fleet against round-robin and least-loaded",
                             _bench_fleet)
    fleet_bench.add_argument("--requests", type=int, default=2000, help="requests per placement strategy")
    fleet_bench.add_argument("--rate", type=float, default=40.0, help="requests per second (an open loop)")
    providers_bench = bench_kind("providers", "LiteLLM's path against the direct one, and what loading it costs",
                                 _bench_providers)
    providers_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    protocols_bench = bench_kind("protocols", "Anthropic's Messages API and OpenAI's Responses API against chat "
                                              "completions, through the whole gateway", _bench_protocols)
    protocols_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    protocols_bench.add_argument("--rounds", type=int, default=3, help="measurements per API, interleaved")
    guardrails_bench = bench_kind("guardrails", "the policy stage's cost, and the personal-data checks' precision "
                                                "and recall on a labelled set", _bench_guardrails)
    guardrails_bench.add_argument("--rounds", type=int, default=50, help="timings per request (medians reported)")
    bench_kind("shares", "the thresholds kept at a target share of large-model calls, on a change of traffic",
               _bench_shares)
    large_bench = bench_kind("large-prompts", "other tenants' latency while one sends 100,000-word prompts",
                             _bench_large_prompts)
    large_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    large_bench.add_argument("--rounds", type=int, default=3, help="measurements with and without, interleaved")
    large_bench.add_argument("--rate", type=float, default=2.0, help="large prompts a second")
    workers_bench = bench_kind("workers", "two worker processes against one, beside the pass-through's own "
                                          "scaling", _bench_workers)
    workers_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    workers_bench.add_argument("--rounds", type=int, default=3, help="measurements per server, interleaved")
    tuning_bench = bench_kind("fine-tuning", "serving while a job trains on the gateway's own worker, and what a "
                                             "job costs the gateway", _bench_fine_tuning)
    tuning_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    tuning_bench.add_argument("--rounds", type=int, default=3, help="measurements with and without, interleaved")
    console_bench = bench_kind("console", "the console's pages with a large ledger behind them", _bench_console)
    console_bench.add_argument("--rows", type=int, default=100_000, help="ledger rows generated over this month")
    console_bench.add_argument("--rounds", type=int, default=20, help="loads of each page")
    ledger_bench = bench_kind("ledger", "the ledger's write rate, and reports at 1 and 10 million rows",
                              _bench_ledger)
    ledger_bench.add_argument("--sizes", default="1000000,10000000", help="ledger sizes to time the reports at")
    ledger_bench.add_argument("--writes", type=int, default=100_000, help="rows written to measure the write rate")
    redis_bench = bench_kind("redis", "the request path on one Redis and on a Redis Cluster", _bench_redis)
    redis_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    retrieval_bench = bench_kind("retrieval", "recall@5 and nDCG@10 of retrieval, and what a chat with retrieval "
                                              "and a semantic lookup add", _bench_retrieval)
    retrieval_bench.add_argument("--requests", type=int, default=100, help="chats per latency measurement")
    retrieval_bench.add_argument("--index-mb", type=float, default=1.0,
                                 help="size of the file indexed while another tenant's latency is measured")
    retrieval_bench.add_argument("--compare-python", default=None,
                                 help="a Python with sentence-transformers, to compare the embedding throughput")
    bench_kind("semantic", "the semantic cache's hits and wrong hits on paraphrases and near misses",
               _bench_semantic)

    args = parser.parse_args(argv)
    if args.command == "bench":  # stopped by SIGTERM, a benchmark still stops the servers it started
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a benchmark is, on stderr, at any moment
    args.run(args)


def _config_dir(args: argparse.Namespace) -> Path:
    return args.config_dir or Settings.from_env().config_dir


def _serve(args: argparse.Namespace) -> None:
    from gateway.server import serve

    for flag, variable in (("host", "HOST"), ("port", "PORT"), ("config_dir", "CONFIG_DIR"), ("workers", "WORKERS")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"GATEWAY_{variable}"] = str(value)
    settings = Settings.from_env()
    _require_valid_config(settings.config_dir)
    serve(settings)


def _require_valid_config(config_dir: Path) -> None:
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    try:
        load_config(config_dir, simulator_url="http://127.0.0.1:0")
    except ConfigError as exc:
        print(f"gateway: the config in {config_dir} has problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _sim(args: argparse.Namespace) -> None:
    from gateway.sim.server import run
    from gateway.sim.settings import SimSettings

    settings = SimSettings(
        models=args.model, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, max_num_seqs=args.max_num_seqs,
        max_loras=args.max_loras, lora_swap_ms=args.lora_swap_ms, error_rate=args.error_rate,
        error_status=args.error_status, hang_rate=args.hang_rate, break_stream_after=args.break_stream_after,
        slow_stream_ms=args.slow_stream_ms, api_key=args.api_key, base_config=args.base_config,
    )
    for index in range(args.nodes):
        print(f"simulator listening on http://{args.host}:{args.port + index}/v1", file=sys.stderr, flush=True)
    run(settings, args.host, args.port, args.nodes)


def _stores(args: argparse.Namespace) -> None:
    from gateway.stores.embedded import running_stores

    data_dir = (args.data_dir or Settings.from_env().data_dir).resolve()
    record = running_stores(data_dir)
    if record is None:
        raise SystemExit(f"gateway stores: no gateway with embedded stores is running on {data_dir} (the stores "
                         f"start with `gateway serve`; with REDIS_URL and DATABASE_URL set, those are the stores)")
    print(f"# embedded stores of gateway process {record['pid']}, data in {record['data_dir']}", file=sys.stderr)
    for name in ("REDIS_URL", "DATABASE_URL"):
        if name in record:
            print(f"export {name}='{record[name]}'")


def _keys_create(args: argparse.Namespace) -> None:
    from gateway.config.keys import add_key_to_tenants_file
    from gateway.config.yaml_source import ConfigError

    name = args.name or dt.datetime.now().strftime("key-%Y%m%d-%H%M%S")
    if args.expires is not None and args.expires <= dt.datetime.now(dt.timezone.utc).date():
        print(f"--expires {args.expires} is in the past: the key would never work (it stops working at the start "
              "of that day, UTC)", file=sys.stderr)
        raise SystemExit(2)
    try:
        key = add_key_to_tenants_file(_config_dir(args), None if args.admin else args.tenant, name,
                                      args.expires.isoformat() if args.expires else None)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        raise SystemExit(2) from None
    owner = "the admin API" if args.admin else f"tenant '{args.tenant}'"
    print(f"# key '{name}' for {owner}: shown once, only its hash is stored", file=sys.stderr)
    print(key)


def _config_check(args: argparse.Namespace) -> None:
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    config_dir = _config_dir(args)
    try:
        config = load_config(config_dir, simulator_url="http://127.0.0.1:0")
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    keys = len(config.keys)
    print(f"{config_dir}: OK ({len(config.models)} models, {len(config.tenants)} tenants, {keys} keys)")


def _output(text: str) -> Path:
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent} to write {path.name} in")
    return path


def _checkout(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path}")
    if not (path / "gateway" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a checkout of the gateway (no gateway/__init__.py)")
    return path


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1 to 65535")
    return int(text)


def _router(args: argparse.Namespace) -> None:
    from gateway.routing import commands
    from gateway.routing.evaluate import BadData
    from gateway.routing.scorer import NotAScorer

    scorer = args.scorer or commands.DEFAULT_PATH
    if args.router_command == "calibrate":
        for name in ("large_share", "critical_share"):
            value = getattr(args, name)
            if value is not None and not 0 < value < 1:
                raise SystemExit(f"gateway router calibrate: --{name.replace('_', '-')} must be between 0 and 1")
        if args.from_ledger:
            database_url = os.environ.get("DATABASE_URL")
            if not database_url:
                raise SystemExit("gateway router calibrate --from-ledger: set DATABASE_URL to the ledger's database")
            commands.print_json(asyncio.run(commands.calibrate_from_ledger(
                database_url, args.tenant, args.days, args.large_share, args.critical_share)))
            return
    if args.router_command == "train":
        _router_train(args, commands)
        return
    data = args.data or commands.DEFAULT_DATA
    if not data.exists():
        raise SystemExit(f"gateway router: no data at {data}; pass --data")
    try:
        if args.router_command == "evaluate":
            commands.print_json(commands.evaluate(data, scorer, args.svg, args.every_row, args.learning_curve))
        else:
            commands.print_json(commands.calibrate(data, scorer, args.large_share, args.critical_share))
    except (BadData, commands.CannotTrain, NotAScorer) as exc:
        raise SystemExit(f"gateway router {args.router_command}: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"gateway router {args.router_command}: cannot read {exc.filename}: {exc.strerror}") from None


def _router_train(args: argparse.Namespace, commands) -> None:
    if args.scorer is None or args.scorer.resolve() == commands.DEFAULT_PATH.resolve():
        raise SystemExit("gateway router train: name the file to write with --scorer (the shipped scorer is never "
                         "overwritten); then name it in models.yaml (router.classifier.scorer)")
    examples, sources = [], []
    if args.from_ledger:
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            raise SystemExit("gateway router train --from-ledger: set DATABASE_URL to the ledger's database")
        examples += asyncio.run(_ledger_examples(commands, database_url, args.tenant, args.days))
        sources.append(f"ledger ({len(examples)} labelled requests)")
    if args.data is not None or not args.from_ledger:
        from gateway.routing.evaluate import BadData, load_examples

        data = args.data or commands.DEFAULT_DATA
        if not data.exists():
            raise SystemExit(f"gateway router: no data at {data}; pass --data")
        try:
            examples += load_examples(data)
        except BadData as exc:
            raise SystemExit(f"gateway router train: {exc}") from None
        sources.append(data.name)
    try:
        commands.print_json(commands.train(examples, args.scorer, args.all, " + ".join(sources)))
    except commands.CannotTrain as exc:
        raise SystemExit(f"gateway router train: {exc}") from None


async def _ledger_examples(commands, database_url: str, tenant: str | None, days: int) -> list:
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        return await commands.ledger_examples(connection, tenant, days)
    finally:
        await connection.close()


def _bench_summary(args: argparse.Namespace) -> None:
    from gateway.bench.summary import run_summary_benchmark

    run_summary_benchmark(duration=args.duration, rounds=args.rounds, output=args.output)


def _bench_providers(args: argparse.Namespace) -> None:
    from gateway.bench.providers import run_provider_benchmark

    run_provider_benchmark(duration=args.duration, output=args.output)


def _bench_protocols(args: argparse.Namespace) -> None:
    from gateway.bench.protocols import run_protocol_benchmark

    run_protocol_benchmark(duration=args.duration, rounds=args.rounds, output=args.output)


def _bench_guardrails(args: argparse.Namespace) -> None:
    from gateway.bench.guardrails import run_guardrail_benchmark

    run_guardrail_benchmark(rounds=args.rounds, output=args.output)


def _bench_fine_tuning(args: argparse.Namespace) -> None:
    from gateway.bench.fine_tuning import run_fine_tuning_benchmark

    run_fine_tuning_benchmark(duration=args.duration, rounds=args.rounds, output=args.output)


def _bench_workers(args: argparse.Namespace) -> None:
    from gateway.bench.workers import run_workers_benchmark

    run_workers_benchmark(duration=args.duration, rounds=args.rounds, output=args.output)


def _bench_large_prompts(args: argparse.Namespace) -> None:
    from gateway.bench.large_prompts import run_large_prompt_benchmark

    run_large_prompt_benchmark(duration=args.duration, rounds=args.rounds, rate=args.rate, output=args.output)


def _bench_shares(args: argparse.Namespace) -> None:
    from gateway.bench.shares import run_share_benchmark

    run_share_benchmark(output=args.output)


def _bench_fleet(args: argparse.Namespace) -> None:
    from gateway.bench.fleet import run_fleet_benchmark

    run_fleet_benchmark(requests=args.requests, rate=args.rate, output=args.output)


def _bench_retrieval(args: argparse.Namespace) -> None:
    from gateway.bench.retrieval import run_retrieval_benchmark

    run_retrieval_benchmark(requests=args.requests, output=args.output, index_mb=args.index_mb,
                            compare_python=args.compare_python)


def _bench_semantic(args: argparse.Namespace) -> None:
    from gateway.bench.retrieval import run_semantic_benchmark

    run_semantic_benchmark(output=args.output)


def _bench_redis(args: argparse.Namespace) -> None:
    from gateway.bench.redis_modes import run_redis_benchmark

    run_redis_benchmark(duration=args.duration, output=args.output)


def _bench_ledger(args: argparse.Namespace) -> None:
    from gateway.bench.ledger import run_ledger_benchmark

    sizes = tuple(int(size) for size in args.sizes.split(","))
    run_ledger_benchmark(sizes=sizes, writes=args.writes, output=args.output)


def _bench_console(args: argparse.Namespace) -> None:
    from gateway.bench.console import run_console_benchmark

    run_console_benchmark(rows=args.rows, rounds=args.rounds, output=args.output)


def _bench_tenants(args: argparse.Namespace) -> None:
    from gateway.bench.tenants import run_tenant_benchmark

    run_tenant_benchmark(tenants=args.tenants, duration=args.duration, output=args.output)


def _bench(args: argparse.Namespace) -> None:
    from gateway.bench.run import run_benchmark

    run_benchmark(duration=args.duration, latency_ms=args.latency_ms, output=args.output, rounds=args.rounds,
                  baseline=args.baseline)


if __name__ == "__main__":
    main()
