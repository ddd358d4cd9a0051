"""Which environment variables a job may set, and the environment it runs with (pure; unit-tested).

``argv[0]`` is allowlisted, but a job also brings its own environment, and many
variables make a program load or run code of the requester's choosing before
``main`` (``LD_AUDIT=/tmp/x.so /bin/true`` runs ``x.so``). So, by default, a job
may set any variable except

* the ones the agent owns: what decides which GPUs the job sees
  (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``, ``NVIDIA_VISIBLE_DEVICES``),
  what decides which program ``argv[0]`` names (``PATH``), and ``AETHER_*``
  (the job id, the agent's NATS secrets). Never settable by a job.
* loader and interpreter hooks (``HOOK_ENV_PREFIXES`` and ``HOOK_ENV`` below):
  every ``LD_*``, glibc's list of variables it ignores in set-uid programs,
  shell start-up files, ``PYTHON*`` other than a few tuning switches, Perl,
  Ruby, Node, Java, Lua, R, Tcl, OpenSSL and git hooks, CUDA/NVTX injection
  libraries, NCCL plugins, and the helpers tools start (``EDITOR``, ``PAGER``).

An operator can allow one of those hooks by name (``--allow-env PYTHONPATH``,
repeatable) on top of the default rules: their decision, warned about at start.
The agent's own variables stay refused whatever the operator says.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from aether_protocol import ENV_NAME_RE as ENV_NAME
from aether_protocol import JobSpec, agent_sets_env

# The agent's own secrets (NATS password, token, creds path) are not the job's business.
SECRET_ENV_PREFIX = "AETHER_NATS"

# Prefixes of variables that load code or options into a program: the dynamic loader (LD_*,
# macOS DYLD_*), Perl (PERL5OPT, PERL5LIB, PERL5DB, ...), Ruby (RUBYOPT, RUBYLIB), Lua (LUA_INIT,
# LUA_PATH, LUA_CPATH and their versioned forms), OpenSSL (OPENSSL_CONF loads engines/providers),
# git (GIT_SSH_COMMAND, GIT_EXEC_PATH, GIT_CONFIG_*), exported bash functions.
HOOK_ENV_PREFIXES = ("LD_", "DYLD_", "PERL", "RUBY", "LUA_", "OPENSSL_", "GIT_", "BASH_FUNC_")
HOOK_ENV = frozenset({
    # glibc's "unsecure" variables (ignored for set-uid programs, for the same reason), but TMPDIR.
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR",
    # Shells: start-up files, traced commands, word splitting.
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH", "GLOBIGNORE",
    "ZDOTDIR", "SHELL",
    # Where programs read their start-up and configuration files (rc files, Python's user site).
    "HOME", "XDG_CONFIG_HOME",
    # Node, Java, Tcl, R, Julia.
    "NODE_OPTIONS", "NODE_PATH", "NODE_REPL_EXTERNAL_MODULE",
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "TCLLIBPATH", "R_PROFILE", "R_PROFILE_USER", "R_ENVIRON", "R_ENVIRON_USER", "R_LIBS", "R_LIBS_USER",
    "JULIA_LOAD_PATH", "JULIA_DEPOT_PATH",
    # Libraries the CUDA driver, NVTX and NCCL load by path or name.
    "CUDA_INJECTION32_PATH", "CUDA_INJECTION64_PATH", "NVTX_INJECTION32_PATH", "NVTX_INJECTION64_PATH",
    "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN",
    # GLib/GTK/GStreamer/Qt modules.
    "GIO_EXTRA_MODULES", "GIO_MODULE_DIR", "GTK_MODULES", "GTK_PATH", "GST_PLUGIN_PATH", "QT_PLUGIN_PATH",
    # GPU and HPC runtimes' loadable drivers and plugins (OpenCL, Vulkan, EGL, Open MPI, UCX, hwloc).
    "OCL_ICD_VENDORS", "OCL_ICD_FILENAMES", "VK_ICD_FILENAMES", "VK_DRIVER_FILES", "VK_ADD_DRIVER_FILES",
    "VK_LAYER_PATH", "VK_ADD_LAYER_PATH", "VK_INSTANCE_LAYERS", "__EGL_VENDOR_LIBRARY_FILENAMES",
    "__EGL_VENDOR_LIBRARY_DIRS", "OMPI_MCA_mca_base_component_path", "UCX_MODULE_DIR", "HWLOC_PLUGINS_PATH",
    # Helper programs tools start.
    "EDITOR", "VISUAL", "PAGER", "MANPAGER", "BROWSER", "LESSOPEN", "LESSCLOSE", "SSH_ASKPASS",
})
# PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, PYTHONUSERBASE, PYTHONWARNINGS (imports a category's
# module), PYTHONBREAKPOINT, ... all load code; a new PYTHON* variable is refused until listed here.
PYTHON_SAFE_ENV = frozenset({
    "PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE",
    "PYTHONFAULTHANDLER", "PYTHONUTF8", "PYTHONOPTIMIZE", "PYTHONNOUSERSITE", "PYTHONSAFEPATH",
    "PYTHONDEVMODE", "PYTHONTRACEMALLOC",
})


def is_hook_env(name: str) -> bool:
    """Whether a variable makes programs load code, options or start-up files from the job's choice."""
    if name in HOOK_ENV or name.startswith(HOOK_ENV_PREFIXES):
        return True
    return name.startswith("PYTHON") and name not in PYTHON_SAFE_ENV


def env_refusal(name: str, allowed_env: tuple[str, ...]) -> str | None:
    """Why a job may not set ``name`` (default rules, plus the hooks an operator allowed), or None."""
    if not ENV_NAME.match(name):
        return f"invalid environment variable name {name!r}"
    if agent_sets_env(name):
        return f"a job may not set {name}: the agent sets it"
    if name in allowed_env:
        return None
    if is_hook_env(name):
        return (f"a job may not set {name}: it makes programs load code or start-up files "
                "(an operator can allow it with --allow-env)")
    return None


def check_allowed_env(names: Iterable[str]) -> list[str]:
    """Validate an operator's ``--allow-env`` list; returns the hooks it opens (for a warning).

    Raises ValueError for a name that is invalid or that the agent always sets itself.
    """
    hooks = []
    for name in names:
        if not ENV_NAME.match(name):
            raise ValueError(f"--allow-env {name!r} is not a valid environment variable name")
        if agent_sets_env(name):
            raise ValueError(f"--allow-env {name}: the agent sets it; jobs may never override it")
        if is_hook_env(name):
            hooks.append(name)
    return hooks


def job_environment(job: JobSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The agent's environment without its secrets, the job's variables, and the GPU selection.

    ``CUDA_VISIBLE_DEVICES`` holds NVML indexes, which follow the PCI bus order (as
    nvidia-smi shows them); CUDA numbers GPUs fastest-first unless ``CUDA_DEVICE_ORDER``
    is ``PCI_BUS_ID``, so without it "GPU 1" could be another card on a mixed host.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(SECRET_ENV_PREFIX)}
    env.update(job.env or {})
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in job.gpus)
    env["AETHER_JOB_ID"] = job.id
    return env
