"""A run's configuration: what identifies a run and the resolvers ``conf/`` uses
(:mod:`~stablelora.config.identity`), the declared type and range of every shared key
(:mod:`~stablelora.config.schema`), the keys each config group's yaml files declare
(:mod:`~stablelora.config.groups`), the check of a composed config before anything loads
(:mod:`~stablelora.config.check`) and the run spec it returns
(:mod:`~stablelora.config.spec`), what ``run.py`` puts around Hydra
(:mod:`~stablelora.config.hydra_guards`), keyword options checked against a function's
signature (:mod:`~stablelora.config.keyword_options`) and the user error every module may raise
(:mod:`~stablelora.config.errors`)."""
