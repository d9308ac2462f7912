FROM scratch
ADD {{GIT}}/repo.git /src/
