FROM busybox
WORKDIR /app
COPY dir ./
