FROM busybox
WORKDIR /app
ADD {{GIT}}/repo.git#v1 src
RUN cat src/README > /seen
