"""``Runtime``: what one node (or ``pollen run``) needs to run workloads, wired together.

One engine (with its epoch ticker), one module cache, one call router, and factories for the
executors that share them. ``close()`` stops everything in an order that lets every instance
end.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pollen.resources.models import WorkloadSpec
from pollen.runtime import abi
from pollen.runtime.cache import ModuleCache
from pollen.runtime.engine import Engine, EngineConfig
from pollen.runtime.executors import Backoff, CommandExecutor, HttpExecutor, RestartPolicy
from pollen.runtime.logs import LogBuffer
from pollen.runtime.pool import WorkerPool
from pollen.runtime.sandbox import Limits, OutputSink, Sandbox
from pollen.runtime.telemetry import UsageCounters


class Runtime:
    """The node's WebAssembly runtime.

    ``cache_dir`` None keeps compiled modules in memory only. ``router`` is where
    ``pollen.call`` goes; by default ``self.local``, which reaches the http executors made
    here. ``workers`` and ``queue_size`` size each http executor's pool.
    """

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        engine_config: EngineConfig | None = None,
        workers: int | None = None,
        queue_size: int = 64,
        router: abi.CallRouter | None = None,
    ) -> None:
        self._engine_config = engine_config
        self._cache_dir = cache_dir
        self._engine: Engine | None = None
        self._cache: ModuleCache | None = None
        self._engine_lock = threading.Lock()
        self.local = abi.LocalCallRouter()
        self.router: abi.CallRouter = router or self.local
        self.workers = workers
        self.queue_size = queue_size
        self._http: list[HttpExecutor] = []
        self._commands: list[CommandExecutor] = []
        self._closed = False

    @property
    def engine(self) -> Engine:
        """The engine, made on first use: a node that runs nothing does not pay for one (its
        epoch ticker thread, its instance pool's reservations)."""
        if self._engine is None:
            # Modules load on worker threads: two first loads at once must share one engine
            # (a module compiled by one engine cannot be linked by another).
            with self._engine_lock:
                if self._engine is None:
                    if self._closed:
                        raise RuntimeError("the runtime is closed")
                    self._engine = Engine(self._engine_config)
        return self._engine

    @property
    def cache(self) -> ModuleCache:
        """The compiled-module cache, made with the engine."""
        if self._cache is None:
            engine = self.engine
            with self._engine_lock:
                if self._cache is None:
                    self._cache = ModuleCache(engine, self._cache_dir)
        return self._cache

    def load(self, wasm: bytes, *, name: str, digest: str | None = None) -> Sandbox:
        """Compile (or fetch from the cache) and link ``wasm`` for workload ``name``.

        Raises ``InvalidModule``, ``MissingExport``, ``MissingImport`` or ``LinkError``.
        """
        cached = self.cache.get(wasm, name=name, digest=digest)
        return Sandbox(self.engine, cached.module, name=name)

    def load_file(self, path: Path, *, name: str | None = None) -> Sandbox:
        """``load`` of a file; the workload is named after the file unless ``name`` is given."""
        return self.load(path.read_bytes(), name=name or path.stem)

    def http_executor(
        self,
        name: str,
        sandbox: Sandbox,
        spec: WorkloadSpec | None = None,
        *,
        limits: Limits | None = None,
        usage: UsageCounters | None = None,
        logs: LogBuffer | None = None,
        register: bool = True,
        inline: bool = False,
    ) -> HttpExecutor:
        """An http executor for ``sandbox``, configured from ``spec`` (env, args, resources),
        reachable by ``pollen.call`` under ``name`` unless ``register`` is False.

        ``inline``: run requests on the event loop's thread while the module proves fast
        (``HttpExecutor.inline``), for a process that serves this one workload."""
        executor = HttpExecutor(
            name,
            sandbox,
            env=spec.env if spec else None,
            args=spec.args if spec else (),
            limits=limits or (Limits.from_resources(spec.resources) if spec else None),
            pool=WorkerPool(self.workers, self.queue_size, name=f"http-{name}"),
            router=self.router,
            usage=usage,
            logs=logs,
            inline=inline,
        )
        self._http.append(executor)
        if register:
            self.local.register(name, executor)
        return executor

    def command_executor(
        self,
        name: str,
        sandbox: Sandbox,
        spec: WorkloadSpec | None = None,
        *,
        limits: Limits | None = None,
        restart: RestartPolicy = RestartPolicy.ON_FAILURE,
        backoff: Backoff | None = None,
        max_restarts: int | None = None,
        usage: UsageCounters | None = None,
        logs: LogBuffer | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        args: list[str] | None = None,
    ) -> CommandExecutor:
        """A command executor for ``sandbox``, configured from ``spec``; ``args`` overrides
        the spec's."""
        executor = CommandExecutor(
            name,
            sandbox,
            args=args if args is not None else (spec.args if spec else ()),
            env=spec.env if spec else None,
            limits=limits or (Limits.from_resources(spec.resources) if spec else None),
            restart=restart,
            backoff=backoff,
            max_restarts=max_restarts,
            router=self.router,
            usage=usage,
            logs=logs,
            stdout=stdout,
            stderr=stderr,
        )
        self._commands.append(executor)
        return executor

    def forget(self, executor: HttpExecutor | CommandExecutor) -> None:
        """Stop tracking a closed executor (and stop routing calls to it)."""
        if isinstance(executor, HttpExecutor):
            self.local.unregister(executor.name, executor)
            if executor in self._http:
                self._http.remove(executor)
        elif executor in self._commands:
            self._commands.remove(executor)

    def close(self) -> None:
        """Stop every executor, then the engine: the epoch ticker must outlive the instances,
        since it is what ends a spinning one."""
        if self._closed:
            return
        self._closed = True
        for executor in self._http:
            self.local.unregister(executor.name, executor)
            executor.close()
        for command in self._commands:
            command.close()
        if self._engine is not None:
            self._engine.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
