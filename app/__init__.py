"""The application on top of the packages: the ``anomstream`` command line and its commands, the
one-command demo, the synthetic feeds, backtests, NAB evaluation runs and the local Kafka broker.
The only package that imports all the others."""
