FROM scratch
COPY --exclude=*.log . /e/
