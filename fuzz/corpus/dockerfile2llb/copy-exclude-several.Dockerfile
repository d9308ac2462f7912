FROM scratch
COPY --exclude=**/*.log --exclude=dir . /e/
