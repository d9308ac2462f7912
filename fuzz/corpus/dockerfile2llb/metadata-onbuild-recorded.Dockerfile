FROM busybox
ONBUILD RUN echo x
ONBUILD COPY . /app
