"""The platform's entry points, the top layer: the `contentml` command (`cli`), the demo, deploying
to the cluster, the pipeline runner, the status report, the manifests' checks and the MLflow
server's launcher. Everything below (contentml, training, monitoring, serving, pipelines and
components) is imported from here, never the other way round."""
