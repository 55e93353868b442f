"""TrainingPlan: the researcher's code that nodes run, and the helpers backends share.

Shipping a plan as source is :mod:`fedcore.plan.bundle`'s work.
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from fedcore.errors import ConfigurationError
from fedcore.plan.loop import REPORT_EVERY_S, LocalLoop, LocalSteps
from fedcore.plan.training import LocalTraining

if TYPE_CHECKING:
    from fedcore.data import Dataset
    from fedcore.params import ParameterSet

__all__ = ["TrainingPlan", "batch_indices", "check_training_args", "collect_predictions"]

#: Parsed ``training_args`` per plan class (weakly: a node loads and drops plan classes).
_PARSED: weakref.WeakKeyDictionary[type, dict[Hashable, LocalTraining]] = \
    weakref.WeakKeyDictionary()
_PARSED_PER_CLASS = 16
_PARSED_LOCK = threading.Lock()


class TrainingPlan(abc.ABC):
    """Base of every training plan; backends subclass it, researchers subclass those.

    Constructor arguments are the configuration: ``model_args`` shape the model (they can
    change between rounds without re-approval), ``training_args`` drive local training (the
    node's policy may override them; parsed once into :attr:`training`), ``data_info`` is
    the merged metadata of the datasets the federation trains on (columns, classes, shapes;
    never paths).
    """

    backend: ClassVar[str] = ""
    #: True when :meth:`set_parameters` restores the model's whole state, so a node may
    #: keep the built plan between rounds of one experiment instead of rebuilding it.
    reusable: ClassVar[bool] = False
    #: Extra lines of Python (usually imports) shipped in front of the plan's source.
    dependencies: ClassVar[tuple[str, ...]] = ()
    #: Local modules or packages the plan imports (``("helpers",)``, ``("mypkg",)``),
    #: shipped with it file by file under the plan's hash. A local import not listed here
    #: is refused when the plan is bundled (at ``Experiment(...)``), not on the nodes.
    helper_modules: ClassVar[tuple[str, ...]] = ()
    #: Names or glob patterns of parameters that stay on each node (``("head.*",)`` for a
    #: personal head as in FedPer, ``("*bn*",)`` for batch-norm layers as in FedBN). They
    #: never leave the node, are kept in its home per experiment and restored each round;
    #: the global model holds the others (:mod:`fedcore.plan.personal`).
    local_parameters: ClassVar[tuple[str, ...]] = ()
    #: Local-training features this plan's :meth:`fit` implements, for aggregation
    #: algorithms that change local training: ``"proximal"`` (applies :attr:`proximal`,
    #: needed by FedProx) and ``"gradient_correction"`` (applies
    #: :attr:`gradient_correction` and reports :attr:`local_steps`, needed by SCAFFOLD).
    #: An experiment whose aggregator needs a feature its plan lacks is refused at once.
    supports: ClassVar[frozenset[str]] = frozenset()
    #: A backend's DP-SGD (a :class:`fedcore.privacy.dpsgd.PrivateTraining` subclass), set
    #: by the backend's base plan class; ``None``: the backend has none. The node takes it
    #: from the backend it installed (through the plug-in registry), never from the
    #: researcher's class, and runs it instead of :meth:`fit`.
    private_training: ClassVar[Any] = None
    #: The ``training_args`` this plan reads besides the common ones (``epochs``,
    #: ``batch_size``, ``num_updates``, ``lr``, ``use_gpu``): name -> type, or a tuple of
    #: types (``object``: anything). Merged along the class hierarchy, so a subclass lists
    #: only the keys it adds. Any other key is refused, naming the close match.
    training_keys: ClassVar[Mapping[str, Any]] = {}
    #: Defaults of ``training_args`` (common or declared), merged like ``training_keys``.
    training_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        model_args: Mapping[str, Any] | None = None,
        training_args: Mapping[str, Any] | None = None,
        data_info: Mapping[str, Any] | None = None,
    ):
        self.model_args = dict(model_args or {})
        #: The typed arguments of local training, checked against :attr:`training_keys`
        #: (raises :class:`~fedcore.errors.ConfigurationError`); ``training_args`` keeps
        #: the mapping as given.
        self.training: LocalTraining = self.parse_training(training_args)
        self.training_args = dict(training_args or {})
        self.data_info = dict(data_info or {})
        #: Settings the node imposes on this run (e.g. ``allow_gpu``); set by the node.
        self.node_settings: dict[str, Any] = {}
        #: Set by the node while a round runs: where :meth:`report` sends progress.
        self.progress_callback: Callable[..., None] | None = None
        self.reset_local_algorithm()

    @classmethod
    def warm_up(cls) -> None:
        """Import what the backend's framework loads only on first use, once per process.

        A simulation calls it for the backends in use once its nodes are built, before it
        freezes its setup (:meth:`fedcore.simulate.SimulatedFederation.freeze_setup`), so
        that the first round does not import them. It must not touch random state or any
        model. The default does nothing; a backend overrides it.
        """
        return

    @classmethod
    def parse_training(cls, training_args: Mapping[str, Any] | None) -> LocalTraining:
        """``training_args`` as this plan class reads them (see :attr:`training_keys`)."""
        # A node checks the same arguments every round, for every request: the result of
        # plain values (a frozen LocalTraining) is kept per class.
        key = LocalTraining.cache_key(training_args)
        parsed = _PARSED.get(cls)
        kept = parsed.get(key) if key is not None and parsed is not None else None
        if kept is not None:
            return kept
        keys: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            keys.update(vars(klass).get("training_keys", {}))
            defaults.update(vars(klass).get("training_defaults", {}))
        training = LocalTraining.parse(training_args, keys=keys, defaults=defaults,
                                       owner=cls.__name__)
        if key is not None:
            with _PARSED_LOCK:  # nodes check on their loop and build plans on workers
                parsed = _PARSED.setdefault(cls, {})
                if len(parsed) >= _PARSED_PER_CLASS:
                    parsed.pop(next(iter(parsed)))
                parsed[key] = training
        return training

    def local_loop(self, batches_per_epoch: int | None = None) -> LocalLoop:
        """The counting of this round's local training, reporting progress to the node.

        ``batches_per_epoch`` (when known) makes progress carry the fraction done. The
        default :meth:`report` only forwards to the node, which sends at most one message
        a second: the loop calls it at most every :data:`~fedcore.plan.loop.REPORT_EVERY_S`
        seconds and after the last step, and not at all outside a node. A plan that
        overrides :meth:`report` gets a call after every step.
        """
        own = type(self).report is not TrainingPlan.report  # an override hears every step
        report = self.report if own or self.progress_callback is not None else None
        return LocalLoop(self.training, report=report, batches_per_epoch=batches_per_epoch,
                         report_every_s=0.0 if own else REPORT_EVERY_S)

    def report(self, *, step: int, loss: float | None = None, epoch: int = 0,
               samples: int = 0, fraction: float | None = None) -> None:
        """Tell the researcher how local training goes (call it freely: it is throttled).

        Backends call it through :meth:`local_loop` (this default at most every
        :data:`~fedcore.plan.loop.REPORT_EVERY_S` seconds and after the last step; an
        override after every step); a custom ``fit`` may call it freely too. ``loss`` is the
        round's mean training loss so far, ``fraction`` the share
        of the round's local work done. The node forwards at most about one report a second
        to the researcher (``Experiment.live``); outside a node it does nothing.
        """
        if self.progress_callback is not None:
            self.progress_callback(step=int(step), epoch=int(epoch),
                                   loss=None if loss is None else float(loss),
                                   samples=int(samples),
                                   fraction=None if fraction is None else float(fraction))

    def reset_local_algorithm(self) -> None:
        """Clear the per-round settings of the aggregation algorithm's node side.

        The node calls it before every round (a built plan may serve several), then the
        algorithm's hooks set what they need, and :meth:`fit` applies it:

        - ``proximal``: ``(mu, global_params)`` or ``None``. A plan that declares
          ``"proximal"`` adds ``mu / 2 * ||w - w_global||^2`` to its local objective
          (FedProx); ``mu == 0`` must leave training bit-for-bit unchanged.
        - ``gradient_correction``: a ParameterSet or ``None``. A plan that declares
          ``"gradient_correction"`` adds ``gradient_correction[name]`` to the gradient of
          each trained parameter at every optimizer step (SCAFFOLD's ``c - c_i``), and after
          training sets ``local_steps``.
        - ``local_steps``: set by :meth:`fit` when ``gradient_correction`` is set (plans
          that declare ``"gradient_correction"``): how many optimizer steps it took and at
          which learning rates.
        """
        self.proximal: tuple[float, ParameterSet] | None = None
        self.gradient_correction: ParameterSet | None = None
        self.local_steps: LocalSteps | None = None

    # --- what a backend provides -----------------------------------------------------------

    @abc.abstractmethod
    def build(self, seed: int) -> None:
        """Create the model (and anything else training needs) reproducibly from ``seed``."""

    @abc.abstractmethod
    def get_parameters(self) -> ParameterSet:
        """The model's parameters; arrays may share memory with the model."""

    @abc.abstractmethod
    def set_parameters(self, params: ParameterSet) -> None:
        """Load ``params`` into the model (copying them: received arrays are read-only)."""

    @abc.abstractmethod
    def fit(self, dataset: Dataset, seed: int) -> dict[str, Any]:
        """Train locally on ``dataset`` for :attr:`training`; return training statistics."""

    @abc.abstractmethod
    def predict(self, dataset: Dataset) -> tuple[Any, Any]:
        """Return ``(y_true, y_pred)`` on ``dataset`` as numpy arrays, for evaluation."""

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``: which metrics evaluation reports."""
        return str(self.model_args.get("task", "classification"))

    def device(self) -> str:
        """Where training ran (``"cpu"``, ``"cuda:0"``...)."""
        return "cpu"

    def classes(self) -> list[Any]:
        """The target's classes, united over every node's dataset (from ``data_info``)."""
        key = self.model_args.get("target") or "target"
        cats = (self.data_info.get("categories") or {}).get(key)
        columns = self.data_info.get("columns")
        if not cats and columns and key not in columns:
            raise ConfigurationError(
                f"The datasets have no column {key!r} to predict. Their columns: "
                f"{list(columns)}. Set model_args['target'] to one of them."
            )
        if not cats:
            raise ConfigurationError(
                f"The datasets' metadata lists no classes for target {key!r}: is it a "
                "discrete column (at most 64 distinct values)? Set model_args['target']."
            )
        return list(cats)

    def class_indices(self, y: Any) -> Any:
        """Labels as indices into :meth:`classes`, identical on every node."""
        import numpy as np

        classes = self.classes()
        lookup = {c: i for i, c in enumerate(classes)}
        try:
            return np.fromiter((lookup[v] for v in np.asarray(y).tolist()), dtype=np.int64,
                               count=len(y))
        except KeyError as exc:
            raise ConfigurationError(
                f"Label {exc.args[0]!r} is not among the federation's classes {classes}."
            ) from None

    # --- hooks a researcher may override ----------------------------------------------------

    def training_data(self, dataset: Dataset) -> Any:
        """Turn the node's dataset into what this backend trains on. Default: ``(X, y)``."""
        return dataset.arrays(
            features=self.model_args.get("features"), target=self.model_args.get("target")
        )

    def _labelled_arrays(self, dataset: Dataset, index_dtype: Any) -> tuple[Any, Any]:
        """``(X, y)`` for neural-network backends, with float32 features.

        Integer or text labels become class indices of ``index_dtype`` (the same on every
        node); other targets become float32.
        """
        import numpy as np

        X, y = TrainingPlan.training_data(self, dataset)
        if y is None:
            raise ConfigurationError("Training needs a target: the dataset has none.")
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if y.dtype.kind in "USO":
            y = self.class_indices(y)
        return X, (y.astype(index_dtype) if y.dtype.kind in "iub" else y.astype(np.float32))


def collect_predictions(pairs: Iterable[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Concatenate per-batch ``(y_true, y_pred)`` into two numpy arrays (empty when none)."""
    import numpy as np

    trues, preds = [], []
    for t, p in pairs:
        trues.append(np.asarray(t))
        preds.append(np.asarray(p))
    if not trues:
        return np.empty(0), np.empty(0)
    return np.concatenate(trues), np.concatenate(preds)


def batch_indices(n: int, batch_size: int, rng: Any = None) -> Iterator[Any]:
    """Index slices of ``n`` samples in batches, for the backends' training loops.

    Shuffled by ``rng`` (a numpy Generator), or in order when it is ``None``.
    """
    order = rng.permutation(n) if rng is not None else None
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size) if order is None else \
            order[start:start + batch_size]


def check_training_args(plan_class: type[TrainingPlan],
                        mapping: Mapping[str, Any] | None) -> LocalTraining:
    """Parse ``mapping`` for ``plan_class``: its declared keys, types and defaults.

    What the researcher's ``Experiment`` calls when ``training_args`` are set, and what
    the node runs before training; raises :class:`~fedcore.errors.ConfigurationError`.
    """
    return plan_class.parse_training(mapping)
