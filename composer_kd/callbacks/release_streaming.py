"""Frees the shared memory of a run's Streaming datasets when its ``Trainer`` is closed."""

from composer.core import Callback, State
from composer.loggers import Logger
from streaming import StreamingDataset

from composer_kd.data.streaming_resources import release_shared_memory

__all__ = ['ReleaseStreamingMemory']


class ReleaseStreamingMemory(Callback):
    """At ``Trainer.close()``, releases the shared memory of the train and eval ``StreamingDataset``s.

    Streaming would keep it until the process exits, and every later dataset of the process would probe it
    (``data/streaming_resources.py``); a process that runs several trainings in a row (the quickstart, a
    notebook) would run out of file descriptors.
    """

    def close(self, state: State, logger: Logger) -> None:
        loaders = [state.train_dataloader, *(e.dataloader.dataloader for e in state.evaluators)]
        for loader in loaders:
            dataset = getattr(loader, 'dataset', None)
            if isinstance(dataset, StreamingDataset):
                release_shared_memory(dataset)
